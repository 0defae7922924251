"""After training: a trained model read back from a run folder or an exported file, evaluation and
prediction, export (ONNX, torch.export, safetensors; conv+BN folding), reports and plots.

May import: `config`, `store`, `data`, `train`. No Ray.
"""

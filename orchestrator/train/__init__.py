"""Training, without Ray: pretrained weights, models and their surgery, optimizers, the per-step loop,
the checkpoint's format and a trainer restored from it, one worker's whole run (`fit`), the driver's
planning (`resolve`), the LR range test, progress events and TensorBoard event files.

May import: `config`, `store`, `data`. Never Ray: the Ray glue (`cluster`) calls into it.
"""

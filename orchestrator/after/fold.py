"""Folding every conv+BatchNorm pair of a model into the conv (torch.fx), for faster inference.

`export --fold-bn` writes folded models, and reading a folded export builds the architecture folded.
"""

from __future__ import annotations

from torch import nn

from orchestrator.config.errors import UserError


class FoldError(UserError):
    """A model whose BatchNorm cannot be folded (exit 2); nothing was written."""


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """(a copy of `model` in eval mode with each conv+BN pair folded into the conv, pairs folded).

    Raises FoldError when the model cannot be traced by torch.fx (control flow on values). A model
    without BatchNorm (a ViT) comes back as it is, 0 pairs folded: there is nothing to trace for.
    """
    from torch.fx.experimental.optimization import fuse

    model = model.eval()
    before = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if before == 0:
        return model, 0
    try:
        folded = fuse(model, inplace=False)
    except Exception as exc:   # torch.fx raises many types (TraceError, TypeError, ...) for untraceable code
        raise FoldError(f"cannot fold BatchNorm in {type(model).__name__}: torch.fx cannot trace it "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); export without --fold-bn") from None
    after = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    return folded.eval(), before - after

"""`model.compile`: torch.compile of the model's forward, in place (`nn.Module.compile`), so its state_dict,
checkpoints and exports keep their plain names (no `_orig_mod.`), the EMA copy stays eager, and DDP
wraps the compiled module as PyTorch's DDP notes allow. Imports no Ray.
"""

from __future__ import annotations

import os
import shutil

from torch import nn

from orchestrator.config.errors import SpecError
from orchestrator.config.spec import CompileSpec, JobSpec


def compile_options(value: bool | CompileSpec) -> dict | None:
    """torch.compile's keyword arguments for a `model.compile` value; None when off."""
    if value is False:
        return None
    chosen = value if isinstance(value, CompileSpec) else CompileSpec()
    return {"mode": chosen.mode, "backend": chosen.backend, "fullgraph": chosen.fullgraph, "dynamic": chosen.dynamic}


def check_compile(spec: JobSpec) -> None:
    """SpecError (exit 2, before any worker starts) where model.compile cannot work: an unknown backend, or
    inductor training on CPU without a C++ compiler (it generates and builds C++ kernels)."""
    options = compile_options(spec.model.compile)
    if options is None:
        return
    import torch._dynamo

    backends = torch._dynamo.list_backends(exclude_tags=())
    if options["backend"] not in backends:
        raise SpecError([f"model.compile.backend: {options['backend']!r} is not a torch.compile backend here; "
                         f"valid: {', '.join(sorted(backends))}"])
    compiler = os.environ.get("CXX") or "c++"
    if options["backend"] == "inductor" and not spec.scaling.use_gpu and shutil.which(compiler) is None:
        raise SpecError([f"model.compile: inductor on CPU builds C++ kernels and finds no compiler ({compiler}, "
                         "set CXX); install one (g++, clang++), use backend aot_eager, or drop model.compile"])


def compile_in_place(model: nn.Module, value: bool | CompileSpec) -> bool:
    """Compile `model`'s forward per `model.compile`; whether it did (the first forward pays the compilation)."""
    options = compile_options(value)
    if options is None:
        return False
    model.compile(**options)
    return True

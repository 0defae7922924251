"""Write orchestrator/config/timm_names.txt: the installed timm's model names, one per line, which
`validate` checks `model.arch: timm/<name>` against without importing torch. Run after upgrading timm."""

from pathlib import Path

import timm

OUT = Path(__file__).resolve().parent.parent / "orchestrator" / "config" / "timm_names.txt"

if __name__ == "__main__":
    names = timm.list_models()
    OUT.write_text(f"# timm {timm.__version__}: timm.list_models(); written by tools/make_timm_names.py\n" + "\n".join(names) + "\n")
    print(f"wrote {len(names)} names to {OUT}")

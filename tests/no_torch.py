"""A ``sitecustomize.py`` that makes torch & co. unimportable in a subprocess (put its folder on
PYTHONPATH) and writes the imported modules' names to the file ``$MODULES_OUT`` at exit.

The import is refused by a finder rather than by ``sys.modules["torch"] = None``: scipy (through
seaborn) looks torch up in sys.modules and would trip over a None there, which a laptop without
torch never has."""
from __future__ import annotations

HEAVY = ("torch", "torchvision", "timm", "faiss")


def sitecustomize(blocked: tuple[str, ...] = HEAVY) -> str:
    return f'''
import atexit, json, os, sys
BLOCKED = {tuple(blocked)!r}

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)")
        return None

sys.meta_path.insert(0, NoTorch())

def _dump():
    with open(os.environ["MODULES_OUT"], "w") as f:
        json.dump(sorted(sys.modules), f)

atexit.register(_dump)
'''

"""`gradflow verify`: every theorem checked on random instances, one verdict table.

Register your own check with [`gradflow.verify.register`][]:

```python
import gradflow as gf
from gradflow.verify import Case, Check, register

def draw(key):
    model = gf.CP.gaussian(key, (3, 3, 3), rank=4, std=0.3)
    objective = gf.Completion.from_tensor(gf.random_cp_tensor(key, (3, 3, 3), 2),
                                          gf.sample_indices(key, (3, 3, 3), 12))
    return Case(model, objective, dict(t1=100.0, observers=["loss"]), "3x3x3, R=4")

register(Check("loss-decreases", "the loss never increases along the flow",
               "any instance", draw,
               lambda tr, case: float(max(0.0, (tr["loss"][1:] - tr["loss"][:-1]).max())),
               tolerance=1e-12))
```
"""

from . import checks as checks
from . import diagonal as diagonal
from .registry import CHECKS as CHECKS
from .registry import Case as Case
from .registry import Check as Check
from .registry import format_row as format_row
from .registry import HEADER as HEADER
from .registry import register as register
from .registry import Result as Result
from .registry import run_check as run_check
from .registry import run_checks as run_checks

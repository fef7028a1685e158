"""socratic: the Ray-free domain core of socratic-distill.

Records (`records`), student text formats (`formats`), answer extraction (`answers`), the safe
calculator (`calculator`) and dataset adapters (`adapters`). Everything that touches Ray,
DeepSpeed or a model lives in `pipelines/`, `trainers/` and `serve/` and imports from here.
"""

__version__ = "0.1.0"

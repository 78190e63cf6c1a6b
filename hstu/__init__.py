"""HSTU generative recommenders trained with PyTorch Lightning (README.md)."""
from hstu.notices import drop_unactionable_notices

drop_unactionable_notices()

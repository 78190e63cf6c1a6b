"""Serving from an export folder. Importing the package registers the config schemas of
scripts/recommend.py and scripts/serve.py (:mod:`hstu.serving.config`), which their YAML files extend."""
from hstu.serving import config  # noqa: F401

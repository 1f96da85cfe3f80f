"""Typed run configuration: dataclasses loaded from YAML, overridden as ``section.key=value``.

Every field's help text is the attribute docstring written under it; ``lmdistill run --help``
prints them. Unknown or mistyped keys are errors that name the key. A method's options live in
the ``method`` section and are validated against that method's own dataclass, selected by
``method.name`` through a registry the caller hands in (``method_configs``), so that this
package imports nothing of lmdistill but :mod:`lmdistill.io`. Entry points call
:func:`lmdistill.methods.load_config`, which hands in every registered method.

- :mod:`.run`: the run's sections and :class:`RunConfig`; :mod:`.elicit`: the ``elicit`` section;
- :mod:`.build`: dataclasses from mappings (type coercion, unknown keys), ``key=value`` overrides;
- :mod:`.help`: the help text (attribute docstrings); :mod:`.load`: YAML in, YAML out.
"""

from lmdistill.config.build import MethodConfigs, build, merge, method_config_class, parse_overrides
from lmdistill.config.elicit import ElicitConfig
from lmdistill.config.errors import ConfigError
from lmdistill.config.help import describe, field_docs
from lmdistill.config.load import load_config, save_config, to_dict
from lmdistill.config.run import (
    DataConfig,
    EvalConfig,
    LoraConfig,
    MethodConfig,
    MixtureMember,
    ModelConfig,
    PruneConfig,
    RunConfig,
    TeacherConfig,
    TrainConfig,
)

__all__ = [
    "ConfigError",
    "DataConfig",
    "ElicitConfig",
    "EvalConfig",
    "LoraConfig",
    "MethodConfig",
    "MethodConfigs",
    "MixtureMember",
    "ModelConfig",
    "PruneConfig",
    "RunConfig",
    "TeacherConfig",
    "TrainConfig",
    "build",
    "describe",
    "field_docs",
    "load_config",
    "merge",
    "method_config_class",
    "parse_overrides",
    "save_config",
    "to_dict",
]

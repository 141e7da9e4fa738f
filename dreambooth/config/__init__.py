"""The one typed configuration of a DreamBooth run.

Owns: the dataclasses (one docstring per field), reading them from YAML and CLI flags (flags win),
and validating them once, before Ray starts anything. Every later stage receives a validated
``RunConfig`` and never parses flags or dicts again.

YAML files may nest keys by section (``train: {learning_rate: 1e-6}``) or give them flat
(``learning_rate: 1e-6``): field names are unique across sections, so a flat key has one home.
CLI flags are the field names with dashes (``--learning-rate``), named as in diffusers'
``train_dreambooth.py`` where the meaning is the same.

Modules: ``schema`` (the dataclasses and their field catalogue), ``loading`` (layers → ``RunConfig``),
``validation`` (checked once, before any cluster time).
"""

from dreambooth.config.schema import (  # noqa: F401 - the package's public names
    ConfigError, ExportConfig, FieldInfo, Launcher, LrScheduler, OptimizerName, Precision, PriorConfig,
    ReportTo, RunConfig, SECTIONS, SaveDtype, SubjectConfig, TrainConfig, UseGpu, all_fields, field_docs,
)
from dreambooth.config.validation import (  # noqa: F401 - the package's public names
    LAUNCHERS, LR_SCHEDULERS, MAX_IDENTIFIER_WORDS, MAX_INSTANCE_IMAGES, MAX_RESOLUTION, MAX_SEED, OPTIMIZERS,
    PRECISIONS, REPORT_TO, SAVE_DTYPES, USE_GPU, check_range, fill_prior_prompt, validate,
    validate_class_noun, validate_generation, validate_identifier, validate_prompt_template,
    validate_resolution,
)
from dreambooth.config.loading import (  # noqa: F401 - the package's public names
    CONFIG_YAML_NODES, MAX_LIST_ITEMS, MAX_LIST_ITEMS_OF, build_config, flatten, load_yaml, load_yaml_document,
    reference_markdown, with_layer,
)

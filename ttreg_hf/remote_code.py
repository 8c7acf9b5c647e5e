"""The remote code of every `transformers` family: two files per family, generated once into
``ttreg_hf/remote/<model type>/`` (the ``model_type`` of the family's tower config, e.g. ``dinov2_tt_reg``) by
``utils/generate_remote_code.py`` from the package's own modules. `save_pretrained`, `push_to_hub` and exports write
them beside the weights, with an ``auto_map`` in ``config.json``, so that plain `transformers` loads the folder
(``trust_remote_code=True``) where ttreg_hf is not installed."""

import shutil
from pathlib import Path

from .family import AUTO_CLASS_NAMES

REMOTE_CODE_DIR = Path(__file__).parent / "remote"
CONFIG_FILE, MODELING_FILE = "configuration_ttreg", "modeling_ttreg"
REMOTE_CODE_FILES = (f"{CONFIG_FILE}.py", f"{MODELING_FILE}.py")


def remote_code_folder(model_class: type, config=None) -> Path | None:
    """The folder of the remote code that defines ``model_class``, if any (none for a subclass of yours): its family's.
    A host's (`ttreg_hf.modeling.hosts`) is the family of its tower's config, in its ``config``."""
    config_class = getattr(model_class, "config_class", None)
    if config is not None and hasattr(config, "register_config"):
        tower_config_class = type(config.register_config).register_config_class()
    elif hasattr(config_class, "register_config_class"):
        tower_config_class = config_class.register_config_class()
    else:
        return None
    folder = REMOTE_CODE_DIR / tower_config_class.model_type
    modeling = folder / REMOTE_CODE_FILES[1]
    defined = modeling.is_file() and f"\nclass {model_class.__name__}(" in modeling.read_text()
    return folder if defined else None


def remote_auto_map(model_class: type, config=None) -> dict[str, str] | None:
    """The ``auto_map`` that loads ``model_class`` (with ``config``, for a host) from its remote code: `AutoConfig`,
    and every Auto class its family declares for it (`Family.auto_classes`, where its parent class stands; `AutoModel`
    where none does, e.g. for `CLIPVisionModelWithProjection`). `None` for a class the remote code does not define."""
    if remote_code_folder(model_class, config) is None:
        return None
    names = list(AUTO_CLASS_NAMES.get(model_class, ()))
    modeling = f"{MODELING_FILE}.{model_class.__name__}"
    return {"AutoConfig": f"{CONFIG_FILE}.{model_class.config_class.__name__}"} | dict.fromkeys(
        names or ["AutoModel"], modeling
    )


def write_remote_code(model_class: type, folder: str | Path, config=None) -> None:
    """Copy the remote code that defines ``model_class`` (with ``config``, for a host) into ``folder``."""
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(remote_code_folder(model_class, config) / name, Path(folder) / name)

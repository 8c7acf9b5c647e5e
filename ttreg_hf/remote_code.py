"""The remote code of every `transformers` family, generated once into ``ttreg_hf/remote/<model type>/`` (the
``model_type`` of the family's tower config, e.g. ``dinov2_tt_reg``) by ``utils/generate_remote_code.py`` from the
package's own modules: two files for the family's classes, and two for the hosts its tower can stand in
(`ttreg_hf.modeling.hosts`), which import the first two. `save_pretrained`, `push_to_hub` and exports write the files
that define the model's class beside the weights, with an ``auto_map`` in ``config.json``, so that plain
`transformers` loads the folder (``trust_remote_code=True``) where ttreg_hf is not installed."""

import shutil
from pathlib import Path

from .family import AUTO_CLASS_NAMES

REMOTE_CODE_DIR = Path(__file__).parent / "remote"
CONFIG_FILE, MODELING_FILE = "configuration_ttreg", "modeling_ttreg"
HOSTS_CONFIG_FILE, HOSTS_MODELING_FILE = "configuration_ttreg_hosts", "modeling_ttreg_hosts"
REMOTE_CODE_FILES = (f"{CONFIG_FILE}.py", f"{MODELING_FILE}.py")
HOSTS_REMOTE_CODE_FILES = (f"{HOSTS_CONFIG_FILE}.py", f"{HOSTS_MODELING_FILE}.py")


def remote_code_files(model_class: type, config=None) -> tuple[Path, ...]:
    """The remote code files that define ``model_class``, configuration file first and modeling file last: its
    family's two, and for a host (`ttreg_hf.modeling.hosts`, the family of its tower's config, in its ``config``) the
    two hosts files after them. Empty for a class the remote code does not define (a subclass of yours)."""
    config_class = getattr(model_class, "config_class", None)
    if config is not None and hasattr(config, "register_config"):
        tower_config_class = type(config.register_config).register_config_class()
    elif hasattr(config_class, "register_config_class"):
        tower_config_class = config_class.register_config_class()
    else:
        return ()
    folder = REMOTE_CODE_DIR / tower_config_class.model_type
    tower = tuple(folder / name for name in REMOTE_CODE_FILES)
    for files in (tower, (*tower, *(folder / name for name in HOSTS_REMOTE_CODE_FILES))):
        if files[-1].is_file() and f"\nclass {model_class.__name__}(" in files[-1].read_text():
            return files
    return ()


def remote_code_folder(model_class: type, config=None) -> Path | None:
    """The folder of the remote code that defines ``model_class`` (`remote_code_files`), if any."""
    files = remote_code_files(model_class, config)
    return files[0].parent if files else None


def remote_auto_map(model_class: type, config=None) -> dict[str, str] | None:
    """The ``auto_map`` that loads ``model_class`` (with ``config``, for a host) from its remote code: `AutoConfig`,
    and every Auto class its family declares for it (`Family.auto_classes`, where its parent class stands; `AutoModel`
    where none does, e.g. for `CLIPVisionModelWithProjection`). `None` for a class the remote code does not define."""
    files = remote_code_files(model_class, config)
    if not files:
        return None
    names = list(AUTO_CLASS_NAMES.get(model_class, ()))
    configuration, modeling = files[-2].stem, files[-1].stem
    return {"AutoConfig": f"{configuration}.{model_class.config_class.__name__}"} | dict.fromkeys(
        names or ["AutoModel"], f"{modeling}.{model_class.__name__}"
    )


def write_remote_code(model_class: type, folder: str | Path, config=None) -> None:
    """Copy the remote code that defines ``model_class`` (with ``config``, for a host) into ``folder``."""
    for path in remote_code_files(model_class, config):
        shutil.copyfile(path, Path(folder) / path.name)

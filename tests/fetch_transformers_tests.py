"""Fetch `transformers`' common model tests for the installed version from its source distribution on PyPI.

    python tests/fetch_transformers_tests.py

Unpacks the sdist's top-level ``tests/*.py`` (``test_modeling_common.py`` and what it imports) into
``.cache/transformers-tests/<version>/transformers_tests``, which `tests/test_common_models.py` imports as a package.
The sdist ships neither ``tests/exporters`` nor ``tests/generation``; their two mixins get empty stand-ins here
(our models do not generate; the export tests do not run). Nothing fetched is committed.
"""

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "transformers-tests"
PACKAGE = "transformers_tests"
FETCH_COMMAND = "python tests/fetch_transformers_tests.py"
STAND_INS = {
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
}


def package_dir(version: str = transformers.__version__) -> Path:
    """Where the tests of ``version`` are (or will be) unpacked."""
    return CACHE / version / PACKAGE


def fetch(version: str = transformers.__version__) -> Path:
    """Download and unpack the tests of ``version`` once; returns the package directory."""
    target = package_dir(version)
    if (target / "test_modeling_common.py").is_file():
        return target
    with tempfile.TemporaryDirectory() as download:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--retries",
                "1",
                "--timeout",
                "30",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"transformers=={version}",
                "-d",
                download,
            ],
            check=True,
        )
        (sdist,) = Path(download).glob("transformers-*.tar.gz")
        prefix = f"transformers-{version}/tests/"
        staging = target.with_name(f"{PACKAGE}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                relative = member.name.removeprefix(prefix)
                top_level = member.name.startswith(prefix) and "/" not in relative
                if member.isfile() and top_level and relative.endswith(".py"):
                    member.name = relative
                    archive.extract(member, staging, filter="data")
    for relative, source in STAND_INS.items():
        (staging / relative).parent.mkdir(exist_ok=True)
        (staging / relative).write_text(source)
        (staging / relative).with_name("__init__.py").touch()
    (staging / "__init__.py").touch()
    staging.rename(target)
    return target


if __name__ == "__main__":
    print(fetch())

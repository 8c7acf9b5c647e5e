"""Print the lowest versions setup.cfg declares, as pins (``torch>=2.13`` -> ``torch==2.13``): what the lowest-versions
environment of `.ci/run` installs, read from the declaration so that the two cannot drift apart."""

import configparser
import re
from pathlib import Path

config = configparser.ConfigParser()
config.read(Path(__file__).resolve().parents[1] / "setup.cfg")
for requirement in config["options"]["install_requires"].split():
    name, lowest = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([^,]+)(?:,.*)?", requirement).groups()
    print(f"{name}=={lowest}")

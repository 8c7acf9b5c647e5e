"""torch.hub entry points: ``torch.hub.load("ttreg-hf/ttreg_hf", "dinov2_vitl14_tt_reg")``.

One entry ``<name>_tt_reg`` per named checkpoint of every family (`ttreg_hf.hub.entry_points`, from the families'
declarations; ``torch.hub.list`` shows them). Every entry takes ``pretrained`` (False: random weights, offline),
``weights`` (a local checkpoint), ``register_neurons`` (a dict, an index file or a shipped index name) and config
fields such as ``num_test_time_registers`` (0 turns the edit off); anything else is a `TypeError`.
"""

dependencies = ["torch", "transformers", "safetensors", "huggingface_hub"]

import ttreg_hf.hub as _hub  # noqa: E402

globals().update(_hub.entry_points())

"""The upstream code we re-state or reach into is pinned in one place (`ttreg_hf.upstream.PINS`), and a release that
changes any of it fails here, naming it."""

import importlib
import inspect
import pkgutil

import open_clip
import transformers
from transformers.models.clip import modeling_clip
from transformers.utils import hub

import ttreg_hf.modeling
from ttreg_hf.upstream import PINS, pin_drift

UPSTREAM = ("transformers", "timm", "open_clip")


def restated_upstream_methods() -> dict[str, str]:
    """Every upstream method that a class of `ttreg_hf.modeling` overrides without calling it (``super().name``):
    the upstream method's dotted path -> ours."""
    restated = {}
    for info in pkgutil.iter_modules(ttreg_hf.modeling.__path__):
        module = importlib.import_module(f"ttreg_hf.modeling.{info.name}")
        for cls in vars(module).values():
            if not inspect.isclass(cls) or cls.__module__ != module.__name__:
                continue
            for name in dir(cls):
                ours = inspect.getattr_static(cls, name)
                function = getattr(ours, "__func__", ours)
                if name.startswith("__") or not inspect.isfunction(function):
                    continue
                parent = next((k for k in cls.__mro__ if name in vars(k) and k.__module__.startswith(UPSTREAM)), None)
                if (
                    function.__module__.startswith("ttreg_hf")
                    and parent
                    and f"super().{name}" not in inspect.getsource(function)
                ):
                    restated[f"{parent.__module__}.{parent.__qualname__}.{name}"] = function.__qualname__
    return restated


def test_every_pin_matches_the_installed_packages():
    assert pin_drift() == [], (
        "re-check the code each line names against the new release, then update ttreg_hf/upstream.py"
    )


def test_every_restated_upstream_method_is_pinned_by_its_source():
    hashed = {pin.name for pin in PINS if pin.sha256}
    restated = restated_upstream_methods()
    assert "transformers.models.siglip2.modeling_siglip2.Siglip2EncoderLayer.forward" in restated  # the scan sees it
    assert {name: ours for name, ours in restated.items() if name not in hashed} == {}, "pin these in PINS"


def test_a_changed_forward_a_missing_private_name_and_a_dropped_keyword_are_reported_by_name(monkeypatch):
    def forward(self, hidden_states):  # a release that rewrote the MLP
        return self.fc2(self.activation_fn(self.fc1(hidden_states)) * 2)

    monkeypatch.setattr(modeling_clip.CLIPMLP, "forward", forward)
    monkeypatch.delattr(open_clip.transformer.VisionTransformer, "_pool")
    monkeypatch.setattr(hub, "cached_files", lambda path_or_repo_id, filenames, **kwargs: None)
    drift = "\n".join(pin_drift())
    version = transformers.__version__
    assert f"transformers.models.clip.modeling_clip.CLIPMLP.forward (transformers {version}; used by " in drift
    assert "EditAfterActivationMixin.forward" in drift and "its source changed" in drift
    assert "open_clip.transformer.VisionTransformer._pool (open_clip_torch " in drift and "gone" in drift
    assert "cached_files" in drift and "no longer takes _raise_exceptions_for_missing_entries" in drift
    assert len(drift.splitlines()) == 3

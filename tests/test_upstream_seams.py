"""Every place lmforge reaches past transformers', TRL's and PEFT's public API is listed in
shared/train/patches/ (its SEAMS); each is checked here against the installed packages, so an
upgrade that renames or reshapes one fails here, naming it, instead of silently or deep in a run."""

from __future__ import annotations

import importlib
import inspect

import pytest

from lmforge.shared.train import patches


def _resolve(qualified: str):
    """'trl.GRPOTrainer._compute_loss' -> (the owner class or module, the attribute name)."""
    parts = qualified.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:-1]:
            owner = getattr(owner, name)
        return owner, parts[-1]
    raise AssertionError(f"{qualified}: no such module")


SEAMS = patches.seams()


def test_the_seams_are_listed():
    names = [s[0] for s in SEAMS]
    assert len(names) == len(set(names)) and len(names) >= 20
    assert {"trl.GRPOTrainer._tokenize_prompts", "transformers.Trainer._save",
            "transformers.Trainer._tr_loss"} <= set(names)


@pytest.mark.parametrize("seam", SEAMS, ids=[s[0] for s in SEAMS])
def test_each_seam_is_where_lmforge_expects_it(seam):
    qualified, kind, expected = seam[:3]
    owner, name = _resolve(qualified)
    where = f"{qualified} (patched in lmforge/shared/train/patches/): "
    if kind == "attribute":
        sources = "\n".join(inspect.getsource(c) for c in inspect.getmro(owner) if c.__module__.split(".")[0]
                            in ("transformers", "trl", "peft", "accelerate"))
        assert f"self.{name}" in sources, where + "the attribute is gone from the class; update the patch"
        return
    function = getattr(owner, name, None)
    assert function is not None, where + "no longer exists upstream; update the patch"
    parameters = list(inspect.signature(function).parameters)
    assert parameters[:len(expected)] == list(expected), \
        where + f"its parameters are now {parameters}, the patch expects {list(expected)}; update the patch"


def test_a_changed_signature_is_reported(monkeypatch):
    """The check above can fail: a hook whose parameters moved is named, with both lists."""
    import trl

    def moved(self, inputs, model):   # parameters swapped
        raise NotImplementedError

    monkeypatch.setattr(trl.GRPOTrainer, "_compute_loss", moved)
    seam = next(s for s in SEAMS if s[0] == "trl.GRPOTrainer._compute_loss")
    with pytest.raises(AssertionError, match="trl.GRPOTrainer._compute_loss.*update the patch"):
        test_each_seam_is_where_lmforge_expects_it(seam)

"""``context_blind`` says what to do (docs/PLATEAU.md): the model has not learned to use context yet, and the
settings the plateau study found to matter; the README's diagnostics section says the same."""

from __future__ import annotations

from trainer.diagnostics.alarms import CONTEXT_BLIND_ADVICE, AlarmInputs, AlarmSettings, context_blind

from helpers import ROOT


def test_the_alarm_says_the_model_has_not_learned_to_use_context_and_what_to_change():
    active, explanation = context_blind(AlarmInputs(step=600, val_loss=3.08, val_step=600, floor=3.07), AlarmSettings())
    assert active and explanation.endswith(CONTEXT_BLIND_ADVICE)
    assert "\n" not in explanation, "one line"
    assert "not using context" in CONTEXT_BLIND_ADVICE and "has not learned to yet" in CONTEXT_BLIND_ADVICE
    assert "--positions rotary" in CONTEXT_BLIND_ADVICE and "train longer" in CONTEXT_BLIND_ADVICE
    assert "docs/PLATEAU.md" in CONTEXT_BLIND_ADVICE


def test_the_readme_diagnostics_section_gives_the_same_advice():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Diagnostics fields"):]
    section = section[: section.index("\n## ", 1)]
    assert CONTEXT_BLIND_ADVICE in " ".join(section.split()), "README.md's diagnostics section quotes the advice"

"""A sweep cut off between layers resumes from its snapshot and gives the uninterrupted circuits exactly."""

import json

import pytest

from circuitlib.discovery.greedy import sweep


@pytest.mark.parametrize("ablation, include_mlps", [("mean", False), ("zero", True)])
def test_a_resumed_sweep_equals_an_uninterrupted_one(arch, models, data, ablation, include_mlps):
    model = models[arch]
    alphas = [0.0, 1e-4, 1e-3, 1e-2, 1e-1]
    snapshots = []
    whole = sweep(
        model, *data, alphas, ablation=ablation, include_mlps=include_mlps, progress=False, on_layer=snapshots.append
    )
    assert [s["next_layer"] for s in snapshots] == list(range(model.cfg.n_layers - 2, -1, -1))
    assert len({len(s["states"]) for s in snapshots}) >= 1
    for snapshot in snapshots:
        saved = json.loads(json.dumps(snapshot))  # as a unit's partial file holds it
        resumed = sweep(
            model, *data, alphas, ablation=ablation, include_mlps=include_mlps, progress=False, resume=saved
        )
        assert [c.to_dict() for c in resumed] == [c.to_dict() for c in whole]


def test_a_snapshot_of_other_settings_is_refused(models, data):
    model = models["gpt2"]
    snapshots = []
    sweep(model, *data, [1e-3, 1e-2], progress=False, on_layer=snapshots.append)
    with pytest.raises(ValueError, match="other alphas"):
        sweep(model, *data, [1e-3], progress=False, resume=snapshots[0])
    with pytest.raises(ValueError, match="another traversal"):
        sweep(model, *data, [1e-3, 1e-2], include_mlps=True, progress=False, resume=snapshots[0])

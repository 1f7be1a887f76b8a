"""Published ground truths of the Tracr programs, typed in from their sources to compare the compiler's
truth with (tests/library/test_compiled.py, test_groundtruth_edges.py)."""

# Published component ground truths (ACDC acdc/tracr_task/utils.py, Edge Pruning's Tracr runs).
PUBLISHED_COMPONENTS = {"reverse": {"0.0", "3.0", "MLP 0", "MLP 1", "MLP 2"}, "xproportion": {"MLP 0", "1.0"}}
# ACDC's edge lists (get_tracr_reverse_edges, get_tracr_proportion_edges), in circuitlib's names:
# hook_embed -> "embed", hook_pos_embed -> "pos", blocks.L.hook_resid_post -> "logits".
ACDC_EDGES = {
    "reverse": {
        "embed -> 0.0.v",
        "0.0 -> MLP 0",
        "embed -> MLP 0",
        "MLP 0 -> MLP 1",
        "embed -> MLP 1",
        "pos -> MLP 1",
        "MLP 1 -> MLP 2",
        "MLP 2 -> 3.0.q",
        "pos -> 3.0.k",
        "embed -> 3.0.v",
        "3.0 -> logits",
    },
    "xproportion": {
        "embed -> MLP 0",
        "MLP 0 -> 1.0.v",
        "embed -> 1.0.q",
        "pos -> 1.0.q",
        "embed -> 1.0.k",
        "pos -> 1.0.k",
        "1.0 -> logits",
    },
}

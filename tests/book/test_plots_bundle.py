"""booklib.attention: the CircuitsVis bundle is shipped once (a static file of the book), and token
labels read as text."""

import numpy as np

from booklib import attention


def test_clean_token_decodes_byte_level_markers():
    assert attention.clean_token("ĠKaren") == " Karen"
    assert attention.clean_token("Ċ") == "\n"
    assert attention.clean_token("ĠÃ©t") == " ét"  # bytes of a UTF-8 character
    assert attention.clean_token("▁Hello") == " Hello"  # SentencePiece
    assert attention.clean_token(" Karen") == " Karen"  # already clean: unchanged
    assert attention.clean_token("café") == "café"


def test_attention_plot_labels_are_clean():
    plot = attention.attention_plot(["ĠThen", "ĠKaren"], np.eye(2), ["9.6"], include_bundle=False)
    assert plot.tokens == [" Then", " Karen"]
    assert "ĠKaren" not in plot._repr_mimebundle_()["text/html"]


def test_saved_loader_output_references_the_static_bundle(tmp_path):
    attention.reset_page()
    saved = attention.load_circuitsvis()._repr_mimebundle_()["text/html"]
    assert len(saved) < 1000 and "var CircuitsVis" not in saved
    assert f'src="../_static/{attention.bundle_filename()}"' in saved
    path = attention.write_circuitsvis_bundle(tmp_path / "_static")
    assert path.name == attention.bundle_filename() and path.stat().st_size > 100_000
    assert "var CircuitsVis" in path.read_text(encoding="utf-8")
    assert "sourceMappingURL" not in path.read_text(encoding="utf-8")
    attention.reset_page()


def test_live_kernel_gets_the_bundle_but_the_notebook_keeps_the_reference():
    """In IPython the loader sends the whole bundle, then replaces it (update_display_data)."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    sent = []
    publish = shell.display_pub.publish

    def record(data, metadata=None, *args, **kwargs):
        sent.append((data, kwargs.get("update", False)))

    shell.display_pub.publish = record
    try:
        attention.reset_page()
        from IPython.display import display

        display(attention.load_circuitsvis())
    finally:
        shell.display_pub.publish = publish
        attention.reset_page()
    assert len(sent) == 2
    (first, first_update), (second, second_update) = sent
    assert "var CircuitsVis" in first["text/html"] and not first_update
    assert second_update and "var CircuitsVis" not in second["text/html"]

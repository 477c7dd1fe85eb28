"""docs/install.md's blocks, without a cluster: every fenced block is named for the node test that follows
the guide literally (tests/node/test_install_guide.py), and what that test substitutes is still there."""

from __future__ import annotations

from tests.node.test_install_guide import (
    GUIDE,
    STEPS,
    guide_blocks,
    project_version,
    substitute,
    substitutions,
)


def test_every_block_of_the_guide_is_run_or_its_node_difference_is_written_down() -> None:
    blocks = guide_blocks(GUIDE.read_text())
    assert [b.name for b in blocks] == list(STEPS)
    for block in blocks:
        what, why = STEPS[block.name]
        assert what != "node differs" or why, f"{block.name}: a skipped block needs its reason"


def test_the_substitutions_are_the_guides_example_names() -> None:
    text = GUIDE.read_text()
    subs = substitutions("http://idp.test:8080", project_version())
    for old, _ in subs:
        assert old in text, old
    done = substitute(text, subs)
    assert "keycloak.example.com" not in done and "registry.example.com/platform" not in done


def test_an_unmarked_block_is_refused() -> None:
    import pytest

    with pytest.raises(AssertionError, match="without an `<!-- install-step"):
        guide_blocks("text\n\n```sh\nkubectl get pods\n```\n")
    (block,) = guide_blocks("<!-- install-step: one -->\n```sh\necho hi\n```\n")
    assert (block.name, block.lang, block.text) == ("one", "sh", "echo hi\n")

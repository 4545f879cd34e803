"""The library: ``ckptscope.formats.open_checkpoint``, parsed in the sandbox as the CLI and the server
parse (``open_checkpoint_sandboxed``), against each producer's own loader."""

from __future__ import annotations

import pytest

from ckptscope.formats import open_checkpoint
from ckptscope.formats.model import checkpoint_to_json
from tests.producers.conftest import CASE_IDS
from tests.producers.faces import library_records, library_stats, sandbox_listing
from tests.producers.truth import assert_listing, assert_pickle_report, assert_stats


def test_listing_matches_the_producer(case, memo):
    """Names, shapes, dtypes, tied tensors (alias_of), kinds and where each kind comes from."""
    ckpt = sandbox_listing(case, memo)
    assert ckpt.format == case.format
    assert ckpt.default_root == case.default_root
    assert_listing(library_records(ckpt), case)


def test_stats_match_torch(case, memo):
    assert_stats(library_stats(case, memo), case)


@pytest.mark.parametrize("case", [i for i in CASE_IDS if not i.startswith("llama-sharded")], indirect=True)
def test_pickle_report_matches_torch(case, memo):
    """Pickled files: every global, whether torch.load(weights_only=True) loads the file, and the
    allowlist that makes it load; none for safetensors."""
    assert_pickle_report(sandbox_listing(case, memo).pickle, case)


def test_the_library_in_process_lists_what_the_sandbox_lists(case, memo):
    """open_checkpoint itself (no sandbox) gives the very listing the sandboxed child sends back."""
    sandboxed = checkpoint_to_json(sandbox_listing(case, memo))
    assert checkpoint_to_json(open_checkpoint(case.path)) == sandboxed

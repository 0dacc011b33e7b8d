"""The per-link encoding policy (pure)."""

from __future__ import annotations

from actors.wire import LinkInfo, choose_link


def test_auto_is_lossless_and_compresses_only_slow_remote_links() -> None:
    same = choose_link(LinkInfo(same_host=True, bandwidth_gbps=0.01))
    assert (same.codec, same.compress, same.encrypt) == ("none", None, False)  # shared memory: nothing to save
    assert choose_link(LinkInfo(same_host=False, bandwidth_gbps=100)).compress is None  # fast: not worth it
    assert choose_link(LinkInfo(same_host=False, bandwidth_gbps=0.1)).compress == "zstd"  # slow WAN link
    assert choose_link(LinkInfo(same_host=False, bandwidth_gbps=None)).compress is None  # unknown: leave it


def test_explicit_choices_apply_everywhere_and_untrusted_links_are_encrypted() -> None:
    link = choose_link(LinkInfo(same_host=True, bandwidth_gbps=None), codec="int8", compress="lz4", block=32)
    assert (link.codec, link.compress, link.block) == ("int8", "lz4", 32)
    assert choose_link(LinkInfo(False, 10, trusted=False)).encrypt
    assert not choose_link(LinkInfo(False, 10, trusted=False), encryption="never").encrypt
    assert choose_link(LinkInfo(True, None), encryption="always").encrypt

"""monitor.kernel.kallsyms: kernel addresses to function+offset, from a fake /proc/kallsyms."""

from __future__ import annotations

from pathlib import Path

import pytest

from monitor.kernel.kallsyms import Symbols, function_ranges

KALLSYMS = """\
0000000000000000 A fixed_percpu_data
ffffffff81000000 T _stext
ffffffff81000000 T startup_64
ffffffff81a0b280 T kfree_skb_reason
ffffffff81a0b300 t skb_release_data
ffffffff81a0b3a0 W __weak_helper
ffffffff81c00000 D some_data
ffffffff81c00040 r some_rodata
ffffffff81a0b200 T ip_rcv_finish
ffffffffc0a01000 t nft_do_chain\t[nf_tables]
ffffffffc0a00000 t nf_hook_slow_mod\t[nf_tables]
"""


@pytest.fixture
def symbols(tmp_path: Path) -> Symbols:
    path = tmp_path / "kallsyms"
    path.write_text(KALLSYMS)
    return Symbols(str(path))


@pytest.mark.parametrize(("address", "name"), [
    (0xFFFFFFFF81A0B2CC, "kfree_skb_reason+0x4c"),
    (0xFFFFFFFF81A0B280, "kfree_skb_reason+0x0"),  # the symbol itself
    (0xFFFFFFFF81A0B27F, "ip_rcv_finish+0x7f"),  # the file is not sorted; the table is
    (0xFFFFFFFF81A0B301, "skb_release_data+0x1"),  # t: a static function
    (0xFFFFFFFF81A0B3A8, "__weak_helper+0x8"),  # W: weak
    (0xFFFFFFFF81C00010, "__weak_helper+0x1f4c70"),  # data symbols are not functions
    (0xFFFFFFFFC0A01010, "nft_do_chain+0x10"),  # a module's, with its [module] column
    (0xFFFFFFFFC0A00FFF, "nf_hook_slow_mod+0xfff"),
])
def test_resolve(symbols: Symbols, address: int, name: str) -> None:
    assert symbols.resolve(address) == name


@pytest.mark.parametrize("address", [0, 1, 0xFFFFFFFF80FFFFFF])
def test_below_the_first_function_is_hex(symbols: Symbols, address: int) -> None:
    assert symbols.resolve(address) == hex(address)


def test_kptr_restrict_zeroes_every_address(tmp_path: Path) -> None:
    path = tmp_path / "kallsyms"
    path.write_text("".join(f"0000000000000000 {line.split(' ', 1)[1]}\n"
                            for line in KALLSYMS.splitlines()))
    symbols = Symbols(str(path))
    assert symbols.resolve(0xFFFFFFFF81A0B2CC) == "0xffffffff81a0b2cc"
    assert symbols.resolve(0) == "0x0"


def test_an_unreadable_file_gives_hex(tmp_path: Path) -> None:
    assert Symbols(str(tmp_path / "missing")).resolve(0xFFFFFFFF81A0B2CC) == "0xffffffff81a0b2cc"


def test_the_file_is_read_once(tmp_path: Path) -> None:
    path = tmp_path / "kallsyms"
    path.write_text(KALLSYMS)
    symbols = Symbols(str(path))
    assert symbols.resolve(0xFFFFFFFF81A0B2CC) == "kfree_skb_reason+0x4c"
    path.write_text("ffffffff81a0b2c0 T something_else\n")
    assert symbols.resolve(0xFFFFFFFF81A0B2CC) == "kfree_skb_reason+0x4c"



def test_a_functions_range_ends_at_the_next_text_symbol(tmp_path: Path) -> None:
    path = tmp_path / "kallsyms"
    path.write_text(KALLSYMS)
    ranges = function_ranges(["ip_rcv_finish", "skb_release_data", "nft_do_chain", "absent"],
                             str(path))
    # data symbols do not end a function; a module's function is not the core's
    assert ranges == {"ip_rcv_finish": (0xffffffff81a0b200, 0xffffffff81a0b280),
                      "skb_release_data": (0xffffffff81a0b300, 0xffffffff81a0b3a0)}


def test_no_ranges_without_addresses_or_file(tmp_path: Path) -> None:
    path = tmp_path / "kallsyms"
    # kptr_restrict without CAP_SYSLOG: every address reads as 0
    path.write_text("".join("0" * 16 + line[16:] + "\n" for line in KALLSYMS.splitlines()))
    assert function_ranges(["ip_rcv_finish"], str(path)) == {}
    assert function_ranges(["ip_rcv_finish"], str(tmp_path / "absent")) == {}

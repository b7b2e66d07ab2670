"""Atomic writes: all or nothing, with the permissions of a plain ``open()``."""

import os
import stat

import pytest

from bgd_dist.io import atomic_write, atomic_write_text


@pytest.fixture
def umask():
    """Set the process umask for one test; restore it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_written_files_get_the_umask_permissions_not_private_ones(tmp_path, umask, mask):
    umask(mask)
    path = tmp_path / "report.json"
    atomic_write_text(path, "{}")
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~mask


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "model.bgd"
    atomic_write_text(path, "old")

    def fail(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bgd"]


def test_a_runs_files_can_be_shared_by_a_team(tmp_path, umask):
    """Every file a run writes follows the umask (0o002: group-writable), as ``open()`` would."""
    from bgd_dist.runner import run

    from toy import toy_config

    umask(0o002)
    run(toy_config(finetune={"global": {"enabled": False}}), tmp_path, do_eval=False, progress=False)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"model.bgd", "report.json", "plan.json", "config.yaml", "manifest.json",
                                         "codebooks.pt"}
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in written}
    assert modes == dict.fromkeys(modes, oct(0o664))

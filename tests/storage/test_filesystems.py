"""Which filesystem a path is on (from mountinfo), and the parallel-write verdict that follows from every rank's."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from shardsave.merged.live import decide_parallel
from shardsave.storage.filesystems import filesystem_type, mount_type, parallel_safe, parse_mountinfo

# A node of a training cluster: root on overlay, local NVMe, a Lustre scratch, NFS home, object stores through
# FUSE (one over-mounted on an earlier tmpfs), and a mount point with a space in its name (written \040).
MOUNTINFO = """\
22 1 0:48 / / rw,relatime master:1 - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:5 - proc proc rw
24 22 259:1 / /local_nvme rw,relatime shared:7 - xfs /dev/nvme0n1 rw,attr2,inode64
25 22 0:50 / /scratch rw,relatime shared:8 master:3 - lustre 10.0.0.1@o2ib:/fs rw,flock
26 22 0:51 / /home rw,relatime - nfs4 nas:/home rw,vers=4.2
27 22 0:52 / /mnt/gcs rw,relatime - tmpfs tmpfs rw
28 22 0:53 / /mnt/gcs rw,nosuid,nodev,relatime - fuse.gcsfuse my-bucket rw,user_id=0
29 22 0:54 / /mnt/s3\\040data rw,relatime - fuse.s3fs s3fs rw
30 22 0:55 / /mnt/blob rw,relatime - fuse.blobfuse2 blobfuse2 rw
31 22 8:17 / /mnt/usb rw,relatime - fuseblk /dev/sdb1 rw
32 24 259:1 /sub /local_nvme/ckpt/nfs rw,relatime - nfs nas:/ckpt rw
"""


def test_mountinfo_gives_the_type_of_the_longest_mount_point_holding_the_path():
    mounts = parse_mountinfo(MOUNTINFO + "garbage line\n\n")
    assert len(mounts) == 11 and ("/mnt/s3 data", "fuse.s3fs") in mounts
    cases = {
        "/": "overlay",
        "/workspace/out/merged": "overlay",  # the container's root
        "/local_nvme/run1/merged": "xfs",
        "/local_nvme/ckpt/nfs/run1": "nfs",  # a mount inside a mount
        "/local_nvme/ckpt/nfsx": "xfs",  # a prefix of the name is no mount point of it
        "/scratch/u/merged": "lustre",
        "/scratch": "lustre",
        "/home/u/merged": "nfs4",
        "/mnt/gcs/models/merged": "fuse.gcsfuse",  # mounted over the tmpfs: the later mount hides it
        "/mnt/s3 data/merged": "fuse.s3fs",
        "/mnt/blob/x": "fuse.blobfuse2",
        "/mnt/usb/x": "fuseblk",
    }
    assert {path: mount_type(path, mounts) for path in cases} == cases
    assert mount_type("/x", []) is None


def test_only_filesystems_known_to_keep_concurrent_writes_are_trusted():
    for fstype in ("ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "lustre", "gpfs", "beegfs", "ceph", "wekafs"):
        assert parallel_safe(fstype), fstype
    for fstype in ("fuse.gcsfuse", "fuse.s3fs", "fuse.blobfuse2", "fuseblk", "fuse", "nfs", "nfs4", "cifs", "smb3",
                   "9p", "virtiofs", "made-up", "", None):  # fmt: skip
        assert not parallel_safe(fstype), fstype


@pytest.mark.skipif(shutil.which("findmnt") is None, reason="needs util-linux findmnt")
def test_the_type_of_a_real_folder_is_what_findmnt_says(tmp_path):
    expected = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", str(tmp_path)], capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
    assert filesystem_type(tmp_path) == expected
    assert filesystem_type(tmp_path / "not" / "yet" / "made") == expected  # where it would be created
    assert parallel_safe(expected), f"this machine's {tmp_path} is on {expected}"


def test_every_rank_must_see_the_folder_on_a_trusted_filesystem_unless_parallel_write_is_required():
    ext4 = {"sees": True, "fs": "ext4"}
    assert decide_parallel({0: ext4, 1: ext4}, None)["parallel"]
    fuse = decide_parallel({0: ext4, 1: {"sees": True, "fs": "fuse.gcsfuse"}}, None)
    assert not fuse["parallel"] and "rank(s) [1]" in fuse["why"] and "fuse.gcsfuse" in fuse["why"]
    assert decide_parallel({0: ext4, 1: {"sees": True, "fs": "nfs4"}}, True)["parallel"]  # checked by reading back
    blind = decide_parallel({0: ext4, 1: {"sees": False, "fs": None}}, None)
    assert not blind["parallel"] and "rank(s) [1] do not see" in blind["why"]

"""Build (and cache) the artifacts of the QEMU test machine: initramfs, slot images, ESP, disk.

Everything is built from plain files as an unprivileged-style pipeline (no loop devices, no
host mounts): ``mkfs.ext4 -d`` populates ext4 images, mtools writes the FAT ESP, sgdisk writes
the GPT and ``dd conv=notrunc`` places the images.

Cache: ``$OTAGUARD_VM_CACHE`` or ``~/.cache/otaguard-vm``. Every artifact lives in a directory
named after a hash of all of its inputs (this file, init.sh, grub.cfg, the kernel and the
busybox binary, the modules copied, the versions of the Debian packages whose tools are run),
so any change rebuilds it. A build happens in a temporary directory that is renamed into place,
under a per-artifact lock, so concurrent test workers never see a half-built artifact.

The guest disk (GPT):
  1  ESP   32 MiB FAT    /EFI/BOOT/BOOTX64.EFI (GRUB + the product grub.cfg),
                         /otaguard/grubenv.{0,1}
  2  slot A 32 MiB       PARTLABEL rootfs-a, an ext4 slot image (16 MiB) at its start
  3  slot B 32 MiB       PARTLABEL rootfs-b
  4  data  64 MiB ext4   PARTLABEL otaguard-data
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from ..support import missing

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
GRUB_CFG = REPO / "src" / "otaguard" / "device" / "linux" / "files" / "grub.cfg"
INIT_SH = HERE / "init.sh"

MIB = 1024 * 1024
SECTOR = 512
ESP_SIZE = 32 * MIB
SLOT_PART_SIZE = 32 * MIB
SLOT_IMAGE_SIZE = 16 * MIB
DATA_SIZE = 64 * MIB
FIRST_LBA = 2048  # 1 MiB alignment
PART_LABELS = ("esp", "rootfs-a", "rootfs-b", "otaguard-data")
PART_SIZES = (ESP_SIZE, SLOT_PART_SIZE, SLOT_PART_SIZE, DATA_SIZE)
PART_TYPES = ("ef00", "8300", "8300", "8300")
DISK_SIZE = FIRST_LBA * SECTOR + sum(PART_SIZES) + 1 * MIB  # + room for the backup GPT

# Fixed identifiers and times, so that images are reproducible and deltas small.
FIXED_TIME = 1_700_000_000
SLOT_FS_UUID = "6f746167-7561-7264-2d73-6c6f74000001"
ESP_VOLUME_ID = "0ba70e5f"
DISK_GUID = "6f746167-7561-7264-2d64-69736b000000"

ENV_COPIES = ("/otaguard/grubenv.0", "/otaguard/grubenv.1")
GRUBENV_SIZE = 1024
GRUBENV_HEADER = b"# GRUB Environment Block\n"

# Debian packages whose programs or files go into the artifacts (their versions are hashed).
PACKAGES = (
    "grub-efi-amd64-bin",
    "grub-common",
    "busybox-static",
    "e2fsprogs",
    "dosfstools",
    "mtools",
    "gdisk",
    "ovmf",
    "qemu-system-x86",
)

# Programs the VM tests run: (program, Debian package).
TOOLS = (
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("grub-mkstandalone", "grub-common"),
    ("grub-editenv", "grub-common"),
    ("mkfs.vfat", "dosfstools"),
    ("mcopy", "mtools"),
    ("mmd", "mtools"),
    ("sgdisk", "gdisk"),
    ("mkfs.ext4", "e2fsprogs"),
    ("debugfs", "e2fsprogs"),
)
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
GRUB_EFI_MODDIR = Path("/usr/lib/grub/x86_64-efi")
BUSYBOX = Path("/bin/busybox")

# Kernel modules the guest init loads (dependencies are added from modules.dep). A leading "?"
# marks a module whose load may fail (crc32c-intel needs SSE4.2, which a TCG CPU may lack).
GUEST_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio-rng",
    "?crc32c-intel",
    "crc32c_generic",
    "ext4",
    "9pnet_virtio",
    "9p",
    "vfat",
    "nls_cp437",
    "nls_iso8859-1",
    "nls_ascii",
    "?efivarfs",
)

MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1", "MTOOLS_NO_VFAT": "0"}


# --- environment checks --------------------------------------------------------------------


def require_vm_tools() -> None:
    """Skip (locally) or fail (CI=true) unless every host tool and file the VM tests need is
    present."""
    for prog, pkg in TOOLS:
        if shutil.which(prog) is None and not Path("/usr/sbin", prog).exists():
            missing(f"program {prog!r} (Debian package {pkg})")
    for path, pkg in (
        (OVMF_CODE, "ovmf"),
        (OVMF_VARS, "ovmf"),
        (GRUB_EFI_MODDIR / "normal.mod", "grub-efi-amd64-bin"),
        (BUSYBOX, "busybox-static"),
    ):
        if not path.exists():
            missing(f"{path} (Debian package {pkg})")
    if b"ld-linux" in BUSYBOX.read_bytes()[:1_000_000]:
        missing(f"a static {BUSYBOX} (Debian package busybox-static)")
    try:
        kernel_release()
    except FileNotFoundError as e:
        missing(f"a kernel with modules: {e} (Debian package linux-image-amd64)")


def _tool(prog: str) -> str:
    path = shutil.which(prog)
    if path is None and Path("/usr/sbin", prog).exists():
        path = str(Path("/usr/sbin", prog))
    if path is None:
        raise FileNotFoundError(prog)
    return path


def _run(argv: list[str], *, env: Mapping[str, str] | None = None, **kw: object) -> str:
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [_tool(argv[0]), *argv[1:]],
        env=full_env,
        capture_output=True,
        text=True,
        check=False,
        **kw,  # type: ignore[call-overload]
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return str(proc.stdout)


# --- the kernel ----------------------------------------------------------------------------


def _version_key(name: str) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", name)]


def kernel_release() -> str:
    """The newest kernel that has both /boot/vmlinuz-<release> and /lib/modules/<release>
    (override: ``$OTAGUARD_VM_KERNEL_RELEASE``)."""
    forced = os.environ.get("OTAGUARD_VM_KERNEL_RELEASE")
    candidates = (
        [forced] if forced else [p.name[len("vmlinuz-") :] for p in Path("/boot").glob("vmlinuz-*")]
    )
    ok = [
        r
        for r in candidates
        if Path(f"/boot/vmlinuz-{r}").is_file() and Path(f"/lib/modules/{r}/modules.dep").is_file()
    ]
    if not ok:
        raise FileNotFoundError("no /boot/vmlinuz-* with a matching /lib/modules/*/modules.dep")
    return sorted(ok, key=_version_key)[-1]


def kernel_path() -> Path:
    return Path(f"/boot/vmlinuz-{kernel_release()}")


def module_load_order(release: str, wanted: tuple[str, ...] = GUEST_MODULES) -> list[str]:
    """Paths (relative to /lib/modules/<release>) in a valid load order, each prefixed with "?"
    when its load may fail. Modules built into the kernel are simply absent from the list."""
    moddir = Path(f"/lib/modules/{release}")
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        name = Path(path).name.split(".ko")[0].replace("-", "_")
        by_name[name] = path
    builtin = (
        {
            Path(line.strip()).name.split(".ko")[0].replace("-", "_")
            for line in (moddir / "modules.builtin").read_text().splitlines()
        }
        if (moddir / "modules.builtin").exists()
        else set()
    )
    order: list[str] = []
    optional: set[str] = set()

    def add(path: str) -> None:
        if path in order:
            return
        for dep in deps[path]:
            add(dep)
        order.append(path)

    for want in wanted:
        opt = want.startswith("?")
        name = want.lstrip("?").replace("-", "_")
        if name not in by_name:
            if name in builtin or opt:
                continue
            raise FileNotFoundError(f"kernel module {name} not found for {release}")
        if opt and by_name[name] not in order:
            optional.add(by_name[name])
        add(by_name[name])
    return [("?" if p in optional else "") + p for p in order]


# --- caching -------------------------------------------------------------------------------


def cache_dir() -> Path:
    base = os.environ.get("OTAGUARD_VM_CACHE") or str(Path.home() / ".cache" / "otaguard-vm")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


_pkg_versions: dict[str, str] = {}


def package_versions() -> str:
    """``name=version`` of the packages in PACKAGES (from dpkg; empty where unknown)."""
    if not _pkg_versions:
        for pkg in PACKAGES:
            proc = subprocess.run(
                ["dpkg-query", "-W", "-f", "${Version}", pkg],
                capture_output=True,
                text=True,
                check=False,
            )
            _pkg_versions[pkg] = proc.stdout.strip() if proc.returncode == 0 else ""
    return ",".join(f"{k}={v}" for k, v in sorted(_pkg_versions.items()))


_file_hashes: dict[tuple[str, int, int], str] = {}


def file_hash(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _file_hashes:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _file_hashes[key] = h.hexdigest()
    return _file_hashes[key]


def cache_key(*parts: object) -> str:
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())  # any change to the build code rebuilds
    h.update(package_versions().encode())
    for part in parts:
        h.update(b"\0")
        h.update(part if isinstance(part, bytes) else repr(part).encode())
    return h.hexdigest()[:20]


def cached(kind: str, key: str, build: Callable[[Path], None]) -> Path:
    """The directory ``<cache>/<kind>-<key>``, built by ``build(tmpdir)`` when missing."""
    root = cache_dir()
    final = root / f"{kind}-{key}"
    if final.is_dir():
        return final
    lock_path = root / f".{kind}-{key}.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=root))
        try:
            build(tmp)
            tmp.chmod(0o755)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    with contextlib.suppress(OSError):
        lock_path.unlink()
    return final


# --- initramfs -----------------------------------------------------------------------------


class _Cpio:
    """A deterministic newc cpio writer (all times FIXED_TIME, uid/gid 0)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 1
        self.names: set[str] = set()

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        name = name.lstrip("/")
        if name in self.names:
            return
        self.names.add(name)
        nameb = name.encode() + b"\0"
        fields = (
            self.ino, mode, 0, 0, 1, FIXED_TIME, len(data), 0, 0, rdev[0], rdev[1], len(nameb), 0,
        )  # fmt: skip
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.ino += 1
        blob = hdr + nameb
        blob += b"\0" * (-len(blob) % 4)
        blob += data + b"\0" * (-len(data) % 4)
        self.parts.append(blob)

    def dir(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self._entry("/".join(parts[:i]), 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.dir(str(Path(name).parent))
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.dir(str(Path(name).parent))
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.dir(str(Path(name).parent))
        self._entry(name, 0o020000 | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self.parts)


def _busybox_cpio(init: bytes) -> _Cpio:
    c = _Cpio()
    for d in ("dev", "proc", "sys", "tmp", "run", "host", "media", "etc", "root", "var"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3, 0o666)
    c.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    applets = subprocess.run(
        [str(BUSYBOX), "--list-full"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in sorted(applets):
        if applet != "bin/busybox":
            c.symlink(applet, "/bin/busybox")
    c.file("init", init, 0o755)
    return c


def initrd() -> Path:
    """The guest initramfs (gzip'ed newc cpio): busybox, the kernel modules of GUEST_MODULES
    with their dependencies, /etc/otaguard-modules (load order) and /init (tests/vm/init.sh)."""
    release = kernel_release()
    order = module_load_order(release)
    moddir = Path(f"/lib/modules/{release}")
    key = cache_key(
        "initrd",
        release,
        INIT_SH.read_bytes(),
        file_hash(BUSYBOX),
        [(p, file_hash(moddir / p.lstrip("?"))) for p in order],
    )

    def build(tmp: Path) -> None:
        c = _busybox_cpio(INIT_SH.read_bytes())
        for p in order:
            rel = p.lstrip("?")
            c.file(f"lib/modules/{release}/{rel}", (moddir / rel).read_bytes())
        c.file(
            "etc/otaguard-modules",
            "".join(
                f"{p[0] if p.startswith('?') else ''}{release}/{p.lstrip('?')}\n" for p in order
            ).encode(),
        )
        (tmp / "initrd.img").write_bytes(gzip.compress(c.finish(), compresslevel=9, mtime=0))

    return cached("initrd", key, build) / "initrd.img"


PROBE_INIT = b"""#!/bin/sh
mount -t proc proc /proc
echo OTAGUARD-PROBE-OK
reboot -f
"""


def probe_initrd() -> Path:
    """A tiny initramfs for the KVM probe: prints OTAGUARD-PROBE-OK and reboots."""
    key = cache_key("probe", PROBE_INIT, file_hash(BUSYBOX))

    def build(tmp: Path) -> None:
        c = _busybox_cpio(PROBE_INIT)
        (tmp / "probe.img").write_bytes(gzip.compress(c.finish(), compresslevel=6, mtime=0))

    return cached("probe", key, build) / "probe.img"


# --- slot images ---------------------------------------------------------------------------


def _fix_mtimes(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in [*filenames, *dirnames]:
            os.utime(Path(dirpath, name), (FIXED_TIME, FIXED_TIME), follow_symlinks=False)
    os.utime(root, (FIXED_TIME, FIXED_TIME))


def mkfs_ext4(image: Path, size: int, src: Path | None, *, journal: bool, fixed: bool) -> None:
    """An ext4 file system image of ``size`` bytes populated from ``src``."""
    with image.open("wb") as f:
        f.truncate(size)
    ext_opts = ["root_owner=0:0"]
    argv = ["mkfs.ext4", "-q", "-F", "-m", "0"]
    env = {}
    if not journal:
        argv += ["-O", "^has_journal"]
    if fixed:
        # Fixed UUID, directory hash seed and clock: the same input gives the same image.
        ext_opts.append(f"hash_seed={SLOT_FS_UUID}")
        argv += ["-U", SLOT_FS_UUID]
        env["E2FSPROGS_FAKE_TIME"] = str(FIXED_TIME)
    argv += ["-E", ",".join(ext_opts)]
    if src is not None:
        argv += ["-d", str(src)]
    _run([*argv, str(image)], env=env)
    if fixed and src is not None:
        # mkfs.ext4 -d copies each source file's ctime (which cannot be set on the source):
        # pin them too, with debugfs (which also recomputes the inode checksums).
        cmds = [f"sif / ctime @{FIXED_TIME}"]
        cmds += [f'sif "/{p.relative_to(src)}" ctime @{FIXED_TIME}' for p in sorted(src.rglob("*"))]
        with tempfile.NamedTemporaryFile("w", suffix=".debugfs") as f:
            f.write("\n".join(cmds) + "\n")
            f.flush()
            _run(["debugfs", "-w", "-f", f.name, str(image)], env=env)


def slot_image(
    version: str, *, hang: bool = False, self_test_ok: bool = True, extra: bytes = b""
) -> Path:
    """A 16 MiB ext4 slot image (no journal) with /boot/vmlinuz, /boot/initrd.img,
    /etc/otaguard-release (VERSION=<version>), /usr/lib/otaguard/self-test (exit 0 or 1),
    /etc/otaguard-hang when ``hang``, and /usr/share/otaguard/extra.bin when ``extra``."""
    if not re.fullmatch(r"[A-Za-z0-9._+~-]{1,64}", version):
        raise ValueError(f"bad version {version!r}")
    kernel = kernel_path()
    rd = initrd()
    key = cache_key("slot", version, hang, self_test_ok, extra, file_hash(kernel), file_hash(rd))

    def build(tmp: Path) -> None:
        root = tmp / "root"
        (root / "boot").mkdir(parents=True)
        shutil.copyfile(kernel, root / "boot" / "vmlinuz")
        shutil.copyfile(rd, root / "boot" / "initrd.img")
        (root / "etc").mkdir()
        (root / "etc" / "otaguard-release").write_text(f"VERSION={version}\n")
        if hang:
            (root / "etc" / "otaguard-hang").write_text("this image never comes up\n")
        st = root / "usr" / "lib" / "otaguard" / "self-test"
        st.parent.mkdir(parents=True)
        st.write_text(f"#!/bin/sh\nexit {0 if self_test_ok else 1}\n")
        st.chmod(0o755)
        if extra:
            (root / "usr" / "share" / "otaguard").mkdir(parents=True)
            (root / "usr" / "share" / "otaguard" / "extra.bin").write_bytes(extra)
        for p in root.rglob("*"):
            if p.is_file() and p != st:
                p.chmod(0o644)
            elif p.is_dir():
                p.chmod(0o755)
        _fix_mtimes(root)
        mkfs_ext4(tmp / "slot.img", SLOT_IMAGE_SIZE, root, journal=False, fixed=True)
        shutil.rmtree(root)

    return cached("slot", key, build) / "slot.img"


def slot_partition_size() -> int:
    """Size in bytes of a slot partition (the slot image sits at its start)."""
    return SLOT_PART_SIZE


# --- ESP -----------------------------------------------------------------------------------


def grub_efi() -> Path:
    """BOOTX64.EFI: a standalone GRUB (all modules in its memdisk) embedding the product
    grub.cfg as (memdisk)/boot/grub/grub.cfg."""
    key = cache_key("grub", GRUB_CFG.read_bytes())

    def build(tmp: Path) -> None:
        cfg = tmp / "grub.cfg"
        shutil.copyfile(GRUB_CFG, cfg)
        _run(
            [
                "grub-mkstandalone",
                "-O",
                "x86_64-efi",
                "-o",
                str(tmp / "BOOTX64.EFI"),
                "--locales=",
                "--fonts=",
                "--themes=",
                f"boot/grub/grub.cfg={cfg}",
            ]
        )

    return cached("grub", key, build) / "BOOTX64.EFI"


def _mtools(argv: list[str]) -> str:
    return _run(argv, env=MTOOLS_ENV)


def esp_image() -> Path:
    """A 32 MiB FAT ESP image with /EFI/BOOT/BOOTX64.EFI and an empty /otaguard/."""
    efi = grub_efi()
    key = cache_key("esp", file_hash(efi))

    def build(tmp: Path) -> None:
        img = tmp / "esp.img"
        with img.open("wb") as f:
            f.truncate(ESP_SIZE)
        _run(["mkfs.vfat", "-n", "ESP", "-i", ESP_VOLUME_ID, str(img)])
        _mtools(["mmd", "-i", str(img), "::/EFI", "::/EFI/BOOT", "::/otaguard"])
        _mtools(["mcopy", "-i", str(img), str(efi), "::/EFI/BOOT/BOOTX64.EFI"])

    return cached("esp", key, build) / "esp.img"


# --- GRUB environment blocks ---------------------------------------------------------------


def make_env(path: Path, env: Mapping[str, str]) -> None:
    """A standard 1024-byte GRUB environment block (grub-editenv) holding ``env``."""
    path.unlink(missing_ok=True)
    _run(["grub-editenv", str(path), "create"])
    if env:
        _run(["grub-editenv", str(path), "set", *(f"{k}={v}" for k, v in env.items())])


def parse_env(block: bytes) -> dict[str, str]:
    """The variables of a GRUB environment block; ValueError if it is not one."""
    if len(block) != GRUBENV_SIZE or not block.startswith(GRUBENV_HEADER):
        raise ValueError("not a GRUB environment block")
    out: dict[str, str] = {}
    for raw in block[len(GRUBENV_HEADER) :].split(b"\n"):
        if not raw or raw.startswith(b"#"):
            continue
        k, sep, v = raw.decode("utf-8", "replace").partition("=")
        if sep:
            # grub-editenv escapes backslash and newline with a backslash
            out[k] = v.replace("\\n", "\n").replace("\\\\", "\\")
    return out


# --- the disk ------------------------------------------------------------------------------


def gpt_partitions(disk: Path) -> list[tuple[int, int, str]]:
    """(byte offset, byte size, name) of each GPT partition entry in use, in entry order."""
    with disk.open("rb") as f:
        f.seek(SECTOR)
        hdr = f.read(92)
        if hdr[:8] != b"EFI PART":
            raise ValueError(f"{disk}: no GPT header")
        entries_lba, count, size = struct.unpack_from("<QII", hdr, 72)
        f.seek(entries_lba * SECTOR)
        table = f.read(count * size)
    out = []
    for i in range(count):
        e = table[i * size : (i + 1) * size]
        if e[:16] == b"\0" * 16:
            continue
        first, last = struct.unpack_from("<QQ", e, 32)
        name = e[56:128].decode("utf-16-le").rstrip("\0")
        out.append((first * SECTOR, (last - first + 1) * SECTOR, name))
    return out


def partition_offset(disk: Path, n: int) -> int:
    """Byte offset of partition ``n`` (1-based) on ``disk``."""
    return gpt_partitions(disk)[n - 1][0]


def partition_size(disk: Path, n: int) -> int:
    return gpt_partitions(disk)[n - 1][1]


def _dd(src: Path, disk: Path, offset: int) -> None:
    _run(
        [
            "dd",
            f"if={src}",
            f"of={disk}",
            "bs=1M",
            f"seek={offset}",
            "oflag=seek_bytes",
            "conv=notrunc,sparse",
            "status=none",
        ]
    )


def write_slot(disk: Path, slot: str, image: Path) -> None:
    """Write a slot image at the start of slot partition ``slot`` ("A" or "B")."""
    n = {"A": 2, "B": 3}[slot]
    if image.stat().st_size > partition_size(disk, n):
        raise ValueError("slot image larger than its partition")
    _dd(image, disk, partition_offset(disk, n))


def disk(
    out: Path,
    *,
    slot_a: Path,
    slot_b: Path | None,
    data_dir: Path | None,
    env: Mapping[str, str],
    esp: Path | None = None,
) -> Path:
    """Assemble the guest disk at ``out``: GPT, ESP (with both env copies made from ``env`` plus
    OG_VALID=1), slot A, slot B (left empty when None), data (ext4 populated from
    ``data_dir``). ``esp``: another image for partition 1 (U-Boot's boot partition, which
    gets no GRUB env copies: tests/vm/ubootvm.py)."""
    out.unlink(missing_ok=True)
    with out.open("wb") as f:
        f.truncate(DISK_SIZE)
    argv = ["sgdisk", "-o", "-U", DISK_GUID]
    start = FIRST_LBA
    for i, (label, size, typ) in enumerate(
        zip(PART_LABELS, PART_SIZES, PART_TYPES, strict=True), 1
    ):
        end = start + size // SECTOR - 1
        part_guid = f"6f746167-7561-7264-2d70-6172740000{i:02x}"
        argv += ["-n", f"{i}:{start}:{end}", "-t", f"{i}:{typ}", "-c", f"{i}:{label}"]
        argv += ["-u", f"{i}:{part_guid}"]
        start = end + 1
    _run([*argv, str(out)])
    parts = gpt_partitions(out)
    assert [p[2] for p in parts] == list(PART_LABELS), parts
    _dd(esp or esp_image(), out, parts[0][0])
    write_slot(out, "A", slot_a)
    if slot_b is not None:
        write_slot(out, "B", slot_b)
    with tempfile.TemporaryDirectory(dir=out.parent) as t:
        data = Path(t) / "data.img"
        mkfs_ext4(data, DATA_SIZE, data_dir, journal=True, fixed=False)
        _dd(data, out, parts[3][0])
    if esp is None:
        for copy in (0, 1):
            write_env(out, copy, {"OG_VALID": "1", **env})
    return out


@contextlib.contextmanager
def _tmpfile(data: bytes = b"") -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as t:
        p = Path(t) / "f"
        p.write_bytes(data)
        yield p


def _esp_spec(disk: Path) -> str:
    return f"{disk}@@{partition_offset(disk, 1)}"


def esp_read(disk: Path, path: str) -> bytes:
    """Contents of file ``path`` (e.g. /otaguard/grubenv.0) on the disk's ESP."""
    with _tmpfile() as tmp:
        _mtools(["mcopy", "-n", "-o", "-i", _esp_spec(disk), f"::{path}", str(tmp)])
        return tmp.read_bytes()


def esp_write(disk: Path, path: str, data: bytes) -> None:
    """Create or replace file ``path`` on the disk's ESP."""
    with _tmpfile(data) as tmp:
        _mtools(["mcopy", "-o", "-i", _esp_spec(disk), str(tmp), f"::{path}"])


def esp_list(disk: Path, path: str = "/") -> str:
    return _mtools(["mdir", "-i", _esp_spec(disk), f"::{path}"])


def data_read(disk: Path, path: str) -> bytes:
    """Contents of file ``path`` on the disk's data partition (ext4, read with debugfs; no
    mount). FileNotFoundError when it does not exist."""
    off = partition_offset(disk, 4)
    with tempfile.TemporaryDirectory() as t:
        out = Path(t) / "f"
        # debugfs reads a file system at an offset with the "device?offset=N" syntax.
        _run(["debugfs", "-R", f"dump {path} {out}", f"{disk}?offset={off}"])
        if not out.exists():
            raise FileNotFoundError(path)
        return out.read_bytes()


def write_env(disk: Path, copy: int, env: Mapping[str, str]) -> None:
    """Write env copy ``copy`` (0 or 1) exactly as given (no OG_VALID is added here)."""
    with tempfile.TemporaryDirectory() as t:
        p = Path(t) / "grubenv"
        make_env(p, env)
        esp_write(disk, ENV_COPIES[copy], p.read_bytes())


def read_env(disk: Path, copy: int) -> dict[str, str]:
    """The variables of env copy ``copy``; ValueError when it is not a valid env block."""
    return parse_env(esp_read(disk, ENV_COPIES[copy]))

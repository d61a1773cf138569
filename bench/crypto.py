"""Crypto throughput: otaguard vs raw `cryptography` vs `openssl speed` vs SoftHSM2.

    .venv/bin/python bench/crypto.py            # ~40 s
    .venv/bin/python bench/crypto.py --quick    # a few seconds

Rows (ops/s, higher is better):
  otaguard sign/verify      SoftwareSigner.sign / PublicKey.verify on a 64-byte message
  otaguard COSE create/verify  sign1(...).encode() / decode_sign1(...).verify(...)
  cryptography sign/verify  the same primitive called directly (the floor for our overhead)
  openssl speed             `openssl speed -seconds 1 ed25519 ecdsap256` in a subprocess
  SoftHSM2 sign             Pkcs11Signer.sign on a fresh temp token (includes the host-side
                            verify self-check), and the bare token signature for comparison
The ratio column is otaguard verify time / raw cryptography verify time (target <= 1.3).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from otaguard.crypto import cose
from otaguard.crypto.algorithms import KeyKind
from otaguard.crypto.software import SoftwareSigner, generate_private_key

MSG = bytes(range(64))
KINDS: tuple[KeyKind, ...] = ("ed25519", "p256")
SOFTHSM_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Operations per second of ``fn`` over about ``seconds`` (after a short warm-up)."""
    t0 = time.perf_counter()
    for _ in range(5):
        fn()
    per_op = max((time.perf_counter() - t0) / 5, 1e-7)
    batch = max(1, int(seconds / 20 / per_op))  # check the clock ~20 times per measurement
    n = 0
    t0 = time.perf_counter()
    while True:
        for _ in range(batch):
            fn()
        n += batch
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return n / elapsed


def openssl_speed() -> dict[str, tuple[float, float]]:
    """{'ed25519': (sign/s, verify/s), 'p256': (...)} parsed from `openssl speed`."""
    exe = shutil.which("openssl")
    if exe is None:
        return {}
    proc = subprocess.run(
        [exe, "speed", "-seconds", "1", "ed25519", "ecdsap256"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    out: dict[str, tuple[float, float]] = {}
    for line in proc.stdout.splitlines():
        m = re.search(r"\((\w+)\)\s+[\d.]+s\s+[\d.]+s\s+([\d.]+)\s+([\d.]+)\s*$", line)
        if not m:
            continue
        name = m.group(1).lower()
        key = {"ed25519": "ed25519", "nistp256": "p256"}.get(name)
        if key:
            out[key] = (float(m.group(2)), float(m.group(3)))
    return out


def best_rates(
    fns: dict[str, Callable[[], object]], seconds: float, rounds: int = 10
) -> dict[str, float]:
    """Measure each fn for ``seconds`` in total, interleaved in rounds; keep its best round.

    Other processes on a shared machine slow whichever measurement they overlap; taking the
    best of several interleaved rounds makes the otaguard/raw ratio far less noisy.
    """
    best = dict.fromkeys(fns, 0.0)
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = max(best[name], rate(fn, seconds / rounds))
    return best


def software_rows(kind: KeyKind, seconds: float) -> dict[str, float]:
    signer = SoftwareSigner(generate_private_key(kind))
    pub = signer.public_key
    sig = signer.sign(MSG)
    msg = cose.sign1(signer, MSG).encode()
    raw_priv = generate_private_key(kind)
    fns: dict[str, Callable[[], object]] = {
        "otaguard sign": lambda: signer.sign(MSG),
        "otaguard verify": lambda: pub.verify(signer.alg, sig, MSG),
        "otaguard COSE create": lambda: cose.sign1(signer, MSG).encode(),
        "otaguard COSE verify": lambda: cose.decode_sign1(msg).verify(pub, MSG),
    }
    if isinstance(raw_priv, ed25519.Ed25519PrivateKey):
        ed_pub = raw_priv.public_key()
        ed_sig = raw_priv.sign(MSG)
        fns["cryptography sign"] = lambda: raw_priv.sign(MSG)
        fns["cryptography verify"] = lambda: ed_pub.verify(ed_sig, MSG)
    else:
        ec_pub = raw_priv.public_key()
        algo = ec.ECDSA(hashes.SHA256())
        der = raw_priv.sign(MSG, algo)
        fns["cryptography sign"] = lambda: raw_priv.sign(MSG, algo)
        fns["cryptography verify"] = lambda: ec_pub.verify(der, MSG, algo)
    return best_rates(fns, seconds)


def softhsm_rows(seconds: float) -> tuple[dict[KeyKind, dict[str, float]], str]:
    module = next((p for p in SOFTHSM_CANDIDATES if os.path.exists(p)), None)
    util = shutil.which("softhsm2-util")
    if module is None or util is None:
        return {}, "SoftHSM2 not installed"
    tmp = Path(tempfile.mkdtemp(prefix="otaguard-bench-hsm-"))
    try:
        (tmp / "tokens").mkdir()
        conf = tmp / "softhsm2.conf"
        conf.write_text(
            f"directories.tokendir = {tmp / 'tokens'}\nobjectstore.backend = file\n"
            "log.level = ERROR\n"
        )
        os.environ["SOFTHSM2_CONF"] = str(conf)
        pin = "bench-pin-1234"
        subprocess.run(
            [
                util,
                "--init-token",
                "--free",
                "--label",
                "bench",
                "--so-pin",
                "so-1234567",
                "--pin",
                pin,
            ],
            check=True,
            capture_output=True,
        )
        from pkcs11 import Mechanism

        from otaguard.crypto.pkcs11 import Pkcs11Signer, generate_keypair

        out: dict[KeyKind, dict[str, float]] = {}
        for kind in KINDS:
            generate_keypair("bench", kind, kind, pin=pin, module=module)
            with Pkcs11Signer.open(
                f"pkcs11:token=bench;object={kind}", pin=pin, module=module
            ) as s:
                key = s._key
                if kind == "ed25519":
                    data, mech = MSG, Mechanism.EDDSA
                else:
                    data, mech = bytes(32), Mechanism.ECDSA  # a SHA-256 digest's length

                def bare(key: object = key, data: bytes = data, mech: Mechanism = mech) -> object:
                    return key.sign(data, mechanism=mech)  # type: ignore[attr-defined]

                out[kind] = best_rates(
                    {
                        "SoftHSM2 sign (Pkcs11Signer)": lambda: s.sign(MSG),
                        "SoftHSM2 sign (bare C_Sign)": bare,
                    },
                    seconds,
                )
        return out, f"SoftHSM2 module {module}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short run (a few seconds)")
    ap.add_argument("--seconds", type=float, help="seconds per measurement")
    args = ap.parse_args(argv)
    seconds = args.seconds or (0.15 if args.quick else 2.0)
    # SoftwareSigner logs a warning per signature by design; keep it out of the timing.
    logging.getLogger("otaguard.keys").setLevel(logging.ERROR)

    t_start = time.perf_counter()
    soft = {kind: software_rows(kind, seconds) for kind in KINDS}
    ossl = openssl_speed()
    hsm, hsm_note = softhsm_rows(seconds)

    def fmt(v: float | None) -> str:
        return f"{v:>12,.0f}" if v is not None else f"{'n/a':>12}"

    names = [
        "otaguard sign",
        "otaguard verify",
        "otaguard COSE create",
        "otaguard COSE verify",
        "cryptography sign",
        "cryptography verify",
        "openssl speed sign",
        "openssl speed verify",
        "SoftHSM2 sign (Pkcs11Signer)",
        "SoftHSM2 sign (bare C_Sign)",
    ]
    print(f"{'operation (ops/s)':<30}{'Ed25519':>12}{'P-256':>12}")
    print("-" * 54)
    for name in names:
        vals: list[float | None] = []
        for kind in KINDS:
            if name.startswith("openssl"):
                pair = ossl.get(kind)
                vals.append(None if pair is None else pair[0 if name.endswith("sign") else 1])
            elif name.startswith("SoftHSM2"):
                vals.append(hsm.get(kind, {}).get(name))
            else:
                vals.append(soft[kind].get(name))
        print(f"{name:<30}{fmt(vals[0])}{fmt(vals[1])}")
    print("-" * 54)
    ratios = [soft[k]["cryptography verify"] / soft[k]["otaguard verify"] for k in KINDS]
    print(f"{'verify time otaguard / raw':<30}{ratios[0]:>11.2f}x{ratios[1]:>11.2f}x")
    cose_ratios = [soft[k]["cryptography verify"] / soft[k]["otaguard COSE verify"] for k in KINDS]
    print(f"{'COSE verify time / raw verify':<30}{cose_ratios[0]:>11.2f}x{cose_ratios[1]:>11.2f}x")
    print()
    print(
        f"{seconds:g} s per measurement; {hsm_note}; python {sys.version.split()[0]}; "
        f"total {time.perf_counter() - t_start:.1f} s"
    )
    target_ok = all(r <= 1.3 for r in ratios)
    print(f"target otaguard verify <= 1.3x raw: {'met' if target_ok else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

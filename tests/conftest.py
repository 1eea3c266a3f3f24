"""Shared fixtures: the real YouTube-8M sample files (tests/data/yt8m), synthetic datasets."""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def real_data() -> Path:
    """``tests/data/yt8m``: real YouTube-8M shards and records (CC BY 4.0; where each file
    came from and its known counts: ``tests/data/yt8m/SOURCES.md``)."""
    return REPO / "tests" / "data" / "yt8m"


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """The ``tiny`` synthetic preset, generated once per test session."""
    from modloc.engine.base.synth import config_from, generate

    out = tmp_path_factory.mktemp("tiny")
    generate(config_from("tiny"), out)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests: tiny models gain nothing from intra-op threads,
    and on a busy 2-core machine the threads' synchronization costs more than the arithmetic
    (tenfold, measured; CPU BatchNorm's threaded kernel stalls ~40 ms per call)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fsynced(monkeypatch) -> dict[int, int]:
    """``os.fsync`` observed at the lowest seam: inode → the file's size at its last fsync,
    filled as the code under test syncs (the real fsync still runs first)."""
    synced: dict[int, int] = {}
    real_fsync = os.fsync

    def observed_fsync(fd):
        real_fsync(fd)
        status = os.fstat(fd)
        synced[status.st_ino] = status.st_size

    monkeypatch.setattr(os, "fsync", observed_fsync)
    return synced


@pytest.fixture(scope="session")
def tiny_checkpoints(tiny_dataset, tmp_path_factory) -> dict[str, str]:
    """A tiny video-level tree pre-trained for 12 steps, and a segment-level one fine-tuned
    from it for 6 (:data:`tiny.TINY_MODEL`), trained once per session."""
    from tiny import TINY_MODEL, split, synth_manifest

    from modloc.training.config import load_config
    from modloc.training.trainer import train

    out = tmp_path_factory.mktemp("runs")
    classes = synth_manifest(tiny_dataset)
    pretrained = train(load_config("pretrain", None, {
        "model.overrides": TINY_MODEL, "data.train": [split(tiny_dataset, "train")],
        "data.classes": classes["segment_class_ids"] + classes["extra_class_ids"],
        "data.pad_to": "longest", "batch_size": 8, "optimizer.learning_rate": 1e-3,
        "max_steps": 12, "log_every": 100, "progress": False, "out": str(out / "pretrain")}))
    finetuned = train(load_config("finetune", None, {
        "init_from": pretrained.checkpoint, "data.train": [split(tiny_dataset, "validate")],
        "data.classes": ",".join(map(str, classes["segment_class_ids"])), "batch_size": 8,
        "optimizer.learning_rate": 1e-3, "max_steps": 6, "epochs": None, "log_every": 100,
        "progress": False, "out": str(out / "finetune")}))
    return {"video": pretrained.checkpoint, "segment": finetuned.checkpoint}


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_checkpoints, tmp_path_factory) -> Path:
    """Both tiny checkpoints exported (distill leaf 0 and ensemble, fp32) as ``modloc
    export`` lays them out: ``<root>/{video,segment}/{distill,ensemble}-fp32``."""
    from modloc.export.exporter import ExportSettings, export_checkpoint

    root = tmp_path_factory.mktemp("artifacts")
    settings = ExportSettings(graphs=("distill", "ensemble"), leaf=0)
    for kind in ("video", "segment"):
        export_checkpoint(tiny_checkpoints[kind], root / kind, settings)
    return root


def _write_cert(tmp: Path, stem: str, subject: str, issuer_key, issuer_name, *, ca: bool,
                sans=(), client: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer_name or name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if not ca:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    certificate = builder.sign(issuer_key or key, hashes.SHA256())
    (tmp / f"{stem}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (tmp / f"{stem}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return key, name


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Path:
    """ca.pem, server.pem/.key (SAN 127.0.0.1, localhost), client.pem/.key, and a second
    CA's client certificate (rogue.pem/.key) that the server must not accept."""
    pytest.importorskip("cryptography")
    from cryptography import x509

    tmp = tmp_path_factory.mktemp("pki")
    ca_key, ca_name = _write_cert(tmp, "ca", "modloc test CA", None, None, ca=True)
    _write_cert(tmp, "server", "modloc test server", ca_key, ca_name, ca=False,
                sans=(x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")))
    _write_cert(tmp, "client", "modloc test client", ca_key, ca_name, ca=False, client=True)
    rogue_key, rogue_name = _write_cert(tmp, "rogue-ca", "rogue CA", None, None, ca=True)
    _write_cert(tmp, "rogue", "rogue client", rogue_key, rogue_name, ca=False, client=True)
    return tmp

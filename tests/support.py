"""Helpers shared by the integration tests: references and the margin rule (a test's reference top-2 logit margin stays above 1e-3)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

from models import Completion


def wait_for(cond: Callable[[], object], timeout: float = 10.0, what: str = "the condition") -> None:
    """Polls `cond` every 50 ms until it is true; fails naming `what` after `timeout` seconds."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def self_signed_tls(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 and its key, as PEM files in `folder`."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def min_margin(completions: list[Completion]) -> float:
    """Smallest top-1 minus top-2 logit gap over every generated step (needs logprobs >= 2)."""
    gaps = []
    for c in completions:
        assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
        for lp in c.logprobs:
            top = sorted(lp.top.values(), reverse=True)
            gaps.append(top[0] - top[1])  # logprob gaps are logit gaps
    return min(gaps)


def tokens(completions: list[Completion]) -> list[list[int]]:
    return [c.token_ids for c in completions]


def load_step(pipe, prompts: list, new_tokens: int, clients: int = 8,  # noqa: ANN001 - a Pipeline
              on_sample=None) -> tuple[dict[int, list[int]], list[tuple[float, int]], float]:  # noqa: ANN001
    """Keeps `clients` greedy requests in flight over `prompts`, sampling the router's token count every
    0.25 s (and calling `on_sample()` then). Returns (tokens by prompt index, [(time.time(), tokens)], start)."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    samples: list[tuple[float, int]] = []
    outs: dict[int, list[int]] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.time(), pipe.stats()["router"]["tokens_generated"]))
            if on_sample is not None:
                on_sample()
            time.sleep(0.25)

    def client(i: int) -> None:
        outs[i] = pipe.generate(prompts[i], max_new_tokens=new_tokens, ignore_eos=True)[0].token_ids

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.time()
    try:
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(client, range(len(prompts))))
    finally:
        done.set()
        sampler.join()
    return outs, samples, start


def token_rate(samples: list[tuple[float, int]], a: float, b: float) -> float:
    """Tokens per second between times `a` and `b` from `load_step`'s samples."""
    window = [(t, n) for t, n in samples if a <= t <= b]
    return (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0])


def last_logits(model, prompt: list[int]):  # noqa: ANN001, ANN201 - a models.Transformer; a tensor
    """`model`'s logits after `prompt`, run alone as one sequence in a fresh cache (no grad)."""
    import torch

    from models import Batch

    with torch.no_grad():
        return model(torch.tensor(prompt), Batch.build(["s"], [0], [len(prompt)]), model.new_cache())[0]

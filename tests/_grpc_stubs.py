"""A gRPC client of flowdsl's service that owes nothing to flowdsl's own client code.

The stubs are generated at test time, by grpcio-tools, from the ``.proto`` files shipped
inside the installed ``flowdsl`` package, the way a user in any language would start.
protoc names the Python modules after the file's path (``flowdsl/v1/flows_pb2.py``), which
the ``flowdsl`` package itself occupies, so they are loaded under names of their own, and
the generated import between the two files is pointed at that name: the one edit a user
vendoring the stubs into their own package makes too.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import flowdsl

PACKAGE_DIR = Path(flowdsl.__file__).parent


def shipped_protos() -> list[Path]:
    return sorted(PACKAGE_DIR.rglob("*.proto"))


def build_stubs(out: Path) -> types.SimpleNamespace:
    """Generate the stubs into *out*; ``.pb`` (messages) and ``.grpc`` (FlowsStub)."""
    import grpc_tools
    from grpc_tools import protoc

    [proto] = [p for p in shipped_protos() if p.name == "flows.proto"]
    # The include root is the directory the proto's package path starts from, so the file
    # keeps its name ("flowdsl/v1/flows.proto") in the descriptor pool.
    root = proto.parents[2]
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{root}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        str(proto.relative_to(root)),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {proto}")
    made = out / "flowdsl" / "v1"
    pb = _load("stubs_flows_pb2", made / "flows_pb2.py")
    text = (made / "flows_pb2_grpc.py").read_text(encoding="utf-8")
    text = text.replace("from flowdsl.v1 import flows_pb2", "import stubs_flows_pb2")
    (out / "stubs_flows_pb2_grpc.py").write_text(text, encoding="utf-8")
    grpc_module = _load("stubs_flows_pb2_grpc", out / "stubs_flows_pb2_grpc.py")
    return types.SimpleNamespace(pb=pb, grpc=grpc_module)


def _load(name: str, path: Path) -> types.ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def self_signed(hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> tuple[bytes, bytes]:
    """A self-signed certificate for *hosts* and its private key, both PEM."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem

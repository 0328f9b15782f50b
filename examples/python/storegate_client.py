#!/usr/bin/env python3
"""A storegate client in Python: grpcio with stubs generated from proto/.

    python storegate_client.py register alice      # the password on stdin
    python storegate_client.py demo alice          # the password on stdin

`register` creates the account. `demo` logs in: the first login enrolls
the TOTP authenticator (the secret from BeginLogin stands in for the app
here, and the code is computed from it, RFC 6238), then it manages a
product (create, get, list, update with a field mask, adjust stock, search,
delete), refreshes the tokens and logs out. Product writes need the admin
role: `auth-service grant-role alice admin` between the two commands.

Stubs are generated at start with grpc_tools.protoc into a temporary
folder, so the .proto files are the only contract. AUTH_SERVICE_URL and
PRODUCT_SERVICE_URL name the services (host:port, default the local
ones); STOREGATE_CA_FILE, when set, makes the channels TLS, verified
against that CA. Prints one JSON line per step; exits 1 with the gRPC
status on the first unexpected answer.
"""

import base64
import hashlib
import hmac
import importlib
import json
import os
import struct
import sys
import tempfile
import time
import uuid

import grpc
from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.join(HERE, "..", "..", "proto")
PROTOS = ["storegate/auth/v1/auth.proto", "storegate/product/v1/product.proto"]


def generate_stubs():
    """Compiles proto/ with protoc's Python plugins; returns the modules."""
    out = tempfile.mkdtemp(prefix="storegate-stubs-")
    # Well-known types (google/protobuf/*.proto) ship with grpc_tools.
    well_known = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={out}", f"--grpc_python_out={out}"]
    if protoc.main(args + PROTOS) != 0:
        sys.exit("protoc failed on proto/")
    sys.path.insert(0, out)
    names = ["storegate.auth.v1.auth_pb2", "storegate.auth.v1.auth_pb2_grpc",
             "storegate.product.v1.product_pb2", "storegate.product.v1.product_pb2_grpc"]
    return [importlib.import_module(name) for name in names]


auth_pb2, auth_grpc, product_pb2, product_grpc = generate_stubs()


def totp(secret_base32, at=None, step=30, digits=6):
    """The RFC 6238 code (HMAC-SHA1) of `secret_base32` at time `at`."""
    key = base64.b32decode(secret_base32 + "=" * (-len(secret_base32) % 8), casefold=True)
    counter = int((time.time() if at is None else at) // step)
    digest = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    number = struct.unpack(">I", digest[offset:offset + 4])[0] & 0x7FFFFFFF
    return str(number % 10**digits).zfill(digits)


def channel(target):
    ca_file = os.environ.get("STOREGATE_CA_FILE")
    if ca_file:
        with open(ca_file, "rb") as f:
            return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=f.read()))
    return grpc.insecure_channel(target)


def say(step, **fields):
    print(json.dumps({"step": step, **fields}), flush=True)


def expect_code(code, call, *args, **kwargs):
    """Runs `call`, which must fail with `code`."""
    try:
        call(*args, **kwargs)
    except grpc.RpcError as e:
        if e.code() != code:
            raise
        return e
    raise AssertionError(f"expected {code.name}, the call succeeded")


def register(auth, username, password):
    reply = auth.Register(auth_pb2.RegisterRequest(username=username, password=password))
    say("register", user_id=reply.user_id)


def demo(auth, products, username, password):
    begun = auth.BeginLogin(auth_pb2.BeginLoginRequest(username=username, password=password))
    if not begun.HasField("enrollment"):
        sys.exit("this demo enrolls: run it on an account that has not logged in yet")
    # An authenticator app scans begun.enrollment.qr_png (a PNG of
    # otpauth_uri); here the secret is the app.
    png = begun.enrollment.qr_png
    say("begin_login", enrolling=True, qr_png_bytes=len(png), png=png[:8] == b"\x89PNG\r\n\x1a\n",
        otpauth_uri_scheme=begun.enrollment.otpauth_uri.split(":", 1)[0])
    secret = begun.enrollment.secret
    tokens = auth.CompleteLogin(auth_pb2.CompleteLoginRequest(login_ticket=begun.login_ticket, code=totp(secret)))
    say("complete_login", token_type=tokens.token_type, expires_in=tokens.expires_in,
        recovery_codes=len(tokens.recovery_codes))
    bearer = [("authorization", f"Bearer {tokens.access_token}")]

    request_id = str(uuid.uuid4())
    new = product_pb2.Product(name="Python teapot", description="Cast iron, 0.8 l", price="31.50", stock=12)
    created = products.CreateProduct(product_pb2.CreateProductRequest(product=new, request_id=request_id), metadata=bearer)
    again = products.CreateProduct(product_pb2.CreateProductRequest(product=new, request_id=request_id), metadata=bearer)
    say("create_product", id=created.id, price=created.price, retried_same_id=again.id == created.id)

    got = products.GetProduct(product_pb2.GetProductRequest(id=created.id), metadata=bearer)
    say("get_product", name=got.name, stock=got.stock)

    page = products.ListProducts(product_pb2.ListProductsRequest(page_size=10, order_by="price desc"), metadata=bearer)
    say("list_products", ids=[p.id for p in page.products], total_size=page.total_size)

    update = product_pb2.UpdateProductRequest(
        product=product_pb2.Product(id=created.id, price="29.99", etag=got.etag))
    update.update_mask.paths.append("price")
    updated = products.UpdateProduct(update, metadata=bearer)
    say("update_product", price=updated.price, name_kept=updated.name == got.name)

    adjusted = products.AdjustStock(product_pb2.AdjustStockRequest(id=created.id, delta=-5), metadata=bearer)
    say("adjust_stock", stock=adjusted.stock)
    refused = expect_code(grpc.StatusCode.FAILED_PRECONDITION, products.AdjustStock,
                          product_pb2.AdjustStockRequest(id=created.id, delta=-100), metadata=bearer)
    say("adjust_stock_below_zero", code=refused.code().name)

    found = products.ListProducts(product_pb2.ListProductsRequest(query="python tea"), metadata=bearer)
    say("search", ids=[p.id for p in found.products])

    products.DeleteProduct(product_pb2.DeleteProductRequest(id=created.id), metadata=bearer)
    gone = expect_code(grpc.StatusCode.NOT_FOUND, products.GetProduct,
                       product_pb2.GetProductRequest(id=created.id), metadata=bearer)
    say("delete_product", then=gone.code().name)

    refreshed = auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=tokens.refresh_token))
    say("refresh_token", rotated=refreshed.refresh_token != tokens.refresh_token)
    auth.Logout(auth_pb2.LogoutRequest(refresh_token=refreshed.refresh_token))
    after = expect_code(grpc.StatusCode.UNAUTHENTICATED, auth.RefreshToken,
                        auth_pb2.RefreshTokenRequest(refresh_token=refreshed.refresh_token))
    say("logout", refresh_then=after.code().name)


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("register", "demo"):
        sys.exit(__doc__)
    command, username = sys.argv[1], sys.argv[2]
    password = sys.stdin.readline().rstrip("\n")
    auth = auth_grpc.AuthServiceStub(channel(os.environ.get("AUTH_SERVICE_URL", "127.0.0.1:50051")))
    products = product_grpc.ProductServiceStub(channel(os.environ.get("PRODUCT_SERVICE_URL", "127.0.0.1:50052")))
    try:
        if command == "register":
            register(auth, username, password)
        else:
            demo(auth, products, username, password)
    except grpc.RpcError as e:
        # The status and its message: never a token or the password.
        sys.exit(f"{e.code().name}: {e.details()}")


if __name__ == "__main__":
    main()

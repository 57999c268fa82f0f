#!/usr/bin/env python3
"""A kongtie-gateway client in Python (grpcio, stubs from grpcio-tools).

Gets the access token, signs a JS-SDK config, creates an order, has the
sandbox pay it, and receives the payment notification as a worker of a
work-queue consumer would (create the consumer once; fetch, process, ack),
then decodes a rich error. Exits non-zero on any wrong answer.

    ./generate.sh && python3 client.py --grpc 127.0.0.1:50051 --sandbox 127.0.0.1:8090
"""

import argparse
import hashlib
import json
import os
import sys
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "gen", "python"))

import grpc  # noqa: E402
from google.protobuf.duration_pb2 import Duration  # noqa: E402
from google.rpc import error_details_pb2  # noqa: E402
from grpc_status import rpc_status  # noqa: E402
from kongtie.v1 import auth_pb2, auth_pb2_grpc  # noqa: E402
from kongtie.v1 import payment_pb2, payment_pb2_grpc  # noqa: E402
from kongtie.v1 import ticket_pb2, ticket_pb2_grpc  # noqa: E402


def check(condition, what):
    if not condition:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--grpc", default="127.0.0.1:50051")
    parser.add_argument("--sandbox", default="127.0.0.1:8090")
    parser.add_argument("--api-key", default=os.environ.get("KONGTIE_API_KEY"))
    args = parser.parse_args()

    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else []
    channel = grpc.insecure_channel(args.grpc)
    auth = auth_pb2_grpc.AuthStub(channel)
    ticket = ticket_pb2_grpc.TicketStub(channel)
    payment = payment_pb2_grpc.PaymentStub(channel)

    token = auth.GetAccessToken(auth_pb2.GetAccessTokenRequest(), metadata=metadata, timeout=10)
    check(token.access_token, "an access token")
    print(f"access token: {len(token.access_token)} characters, fetched {token.fetched_at.ToJsonString()}")

    page = "https://shop.example.com/pay?order=1"
    config = ticket.SignJsSdkConfig(ticket_pb2.SignJsSdkConfigRequest(url=page + "#top"), metadata=metadata, timeout=10)
    jsapi = ticket.GetJsApiTicket(ticket_pb2.GetJsApiTicketRequest(), metadata=metadata, timeout=10).ticket
    expected = hashlib.sha1(
        f"jsapi_ticket={jsapi}&noncestr={config.nonce_str}&timestamp={config.timestamp}&url={page}".encode()
    ).hexdigest()
    check(config.signature == expected, "the wx.config signature verifies")
    print(f"wx.config: appId={config.app_id} signature verified")

    order_id = f"PY{int(time.time() * 1000) % 10**12}"
    order = payment.CreateJsapiOrder(
        payment_pb2.CreateJsapiOrderRequest(out_trade_id=order_id, amount_fen=20, openid="oPythonExample"),
        metadata=metadata,
        timeout=10,
    )
    check(order.pay_params.package.startswith("prepay_id="), "pay parameters")
    print(f"order {order_id}: {order.pay_params.package}")

    # A work-queue consumer, created once: any number of workers (on any
    # replica) share its events, each leased to one worker until acked.
    # Creating it again with the same settings (every worker at start) is a
    # no-op. DELIVER_POLICY_NEW: events from now on.
    payment.CreateConsumer(
        payment_pb2.CreateConsumerRequest(
            name="python-worker",
            deliver_policy=payment_pb2.DELIVER_POLICY_NEW,
            ack_wait=Duration(seconds=30),
        ),
        metadata=metadata,
        timeout=10,
    )

    pay = urllib.request.Request(f"http://{args.sandbox}/sandbox/orders/{order_id}/pay", method="POST")
    with urllib.request.urlopen(pay, timeout=10) as resp:
        print(f"sandbox pays: {json.load(resp)}")

    # The worker loop: fetch (waiting up to 5 s), process, ack each event.
    # An event not acked within ack_wait is delivered again (delivery_count
    # > 1), so processing must be idempotent.
    notification = None
    deadline = time.time() + 15
    while notification is None and time.time() < deadline:
        batch = payment.FetchNotifications(
            payment_pb2.FetchNotificationsRequest(consumer="python-worker", max_events=10, wait=Duration(seconds=5)),
            metadata=metadata,
            timeout=10,
        )
        for event in batch.events:
            n = event.notification
            # Ship goods only on a payment of an order this gateway created,
            # for its amount; other events are processed by skipping them.
            if n.out_trade_id == order_id and n.paid and n.order_check == payment_pb2.ORDER_CHECK_MATCHED:
                notification = n
            acked = payment.AckNotifications(
                payment_pb2.AckNotificationsRequest(consumer="python-worker", sequences=[n.sequence]),
                metadata=metadata,
                timeout=10,
            )
            print(f"worker: event {n.sequence} (delivery {event.delivery_count}) acked, newly={acked.newly_acked}")
    check(notification is not None, "the paid notification of our order, within 15 s")
    check(notification.amount_fen == 20 and notification.trade_amount == "0.20", "the amount")
    print(f"notification {notification.sequence}: {order_id} paid {notification.trade_amount} yuan")

    consumer = payment.GetConsumer(payment_pb2.GetConsumerRequest(name="python-worker"), metadata=metadata, timeout=10)
    check(consumer.consumer.pending == 0, "nothing left pending")
    print(f"consumer python-worker: acked up to {consumer.consumer.acked_sequence}, lag {consumer.consumer.lag}")

    # A rich error: an invalid amount names its field in google.rpc.BadRequest.
    try:
        payment.CreateJsapiOrder(
            payment_pb2.CreateJsapiOrderRequest(out_trade_id=order_id + "X", amount_fen=0, openid="oPythonExample"),
            metadata=metadata,
            timeout=10,
        )
        check(False, "an invalid amount is refused")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.INVALID_ARGUMENT, f"INVALID_ARGUMENT, not {e.code()}")
        status = rpc_status.from_call(e)
        fields = []
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                for v in bad.field_violations:
                    print(f"rich error: field {v.field}: {v.description}")
                    fields.append(v.field)
        check(fields == ["amount_fen"], f"the violation names amount_fen, not {fields}")

    print("python example: OK")


if __name__ == "__main__":
    main()

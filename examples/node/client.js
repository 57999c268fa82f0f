#!/usr/bin/env node
// A kongtie-gateway client in Node.js (@grpc/grpc-js, @grpc/proto-loader).
//
// Gets the access token, signs a JS-SDK config, creates an order, subscribes
// to payment notifications, has the sandbox pay the order, receives the
// notification and acknowledges it, then decodes a rich error. Exits
// non-zero on any wrong answer.
//
//   npm ci && node client.js --grpc 127.0.0.1:50051 --sandbox 127.0.0.1:8090
'use strict';

const crypto = require('node:crypto');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : fallback;
}

function check(condition, what) {
  if (!condition) {
    console.error(`FAILED: ${what}`);
    process.exit(1);
  }
}

const grpcAddr = arg('grpc', '127.0.0.1:50051');
const sandbox = arg('sandbox', '127.0.0.1:8090');
const apiKey = arg('api-key', process.env.KONGTIE_API_KEY);

const protoRoot = path.join(__dirname, '..', '..', 'proto');
const definition = protoLoader.loadSync(
  ['kongtie/v1/auth.proto', 'kongtie/v1/ticket.proto', 'kongtie/v1/payment.proto'],
  { includeDirs: [protoRoot], keepCase: false, longs: String, enums: String, defaults: true, oneofs: true },
);
const kongtie = grpc.loadPackageDefinition(definition).kongtie.v1;
const credentials = grpc.credentials.createInsecure();
const auth = new kongtie.Auth(grpcAddr, credentials);
const ticket = new kongtie.Ticket(grpcAddr, credentials);
const payment = new kongtie.Payment(grpcAddr, credentials);

function metadata() {
  const md = new grpc.Metadata();
  if (apiKey) md.set('authorization', `Bearer ${apiKey}`);
  return md;
}

function call(client, method, request) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + 10_000);
    client[method](request, metadata(), { deadline }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

// google.rpc.Status and the two details we use, for `grpc-status-details-bin`.
const rpcTypes = protobuf.parse(`
  syntax = "proto3";
  package google.rpc;
  message Any { string type_url = 1; bytes value = 2; }
  message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
  message BadRequest {
    message FieldViolation { string field = 1; string description = 2; }
    repeated FieldViolation field_violations = 1;
  }
`).root;

function badRequestFields(err) {
  const [bin] = err.metadata.get('grpc-status-details-bin');
  check(bin, 'the error carries grpc-status-details-bin');
  const status = rpcTypes.lookupType('google.rpc.Status').decode(bin);
  const fields = [];
  for (const any of status.details) {
    if (any.typeUrl === 'type.googleapis.com/google.rpc.BadRequest') {
      const bad = rpcTypes.lookupType('google.rpc.BadRequest').decode(any.value);
      for (const v of bad.fieldViolations) {
        console.log(`rich error: field ${v.field}: ${v.description}`);
        fields.push(v.field);
      }
    }
  }
  return fields;
}

async function main() {
  const token = await call(auth, 'GetAccessToken', {});
  check(token.accessToken, 'an access token');
  console.log(`access token: ${token.accessToken.length} characters`);

  const page = 'https://shop.example.com/pay?order=1';
  const config = await call(ticket, 'SignJsSdkConfig', { url: `${page}#top` });
  const { ticket: jsapi } = await call(ticket, 'GetJsApiTicket', {});
  const expected = crypto
    .createHash('sha1')
    .update(`jsapi_ticket=${jsapi}&noncestr=${config.nonceStr}&timestamp=${config.timestamp}&url=${page}`)
    .digest('hex');
  check(config.signature === expected, 'the wx.config signature verifies');
  console.log(`wx.config: appId=${config.appId} signature verified`);

  const orderId = `NODE${Date.now() % 1e12}`;
  const order = await call(payment, 'CreateJsapiOrder', { outTradeId: orderId, amountFen: 20, openid: 'oNodeExample' });
  check(order.payParams.package.startsWith('prepay_id='), 'pay parameters');
  console.log(`order ${orderId}: ${order.payParams.package}`);

  // A work-queue consumer, created once (again at every worker's start is a
  // no-op): workers on any replica share its events.
  await call(payment, 'CreateConsumer', {
    name: 'node-worker',
    deliverPolicy: 'DELIVER_POLICY_NEW',
    ackWait: { seconds: 30 },
  });

  // Subscribe as a durable cursor consumer before paying. A consumer sees every
  // event (its acknowledgement covers all before it), so other orders'
  // events are skipped here, not filtered away.
  const stream = payment.SubscribeNotifications({ consumer: 'node-example' }, metadata());
  const received = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('no notification within 15 s')), 15_000);
    stream.on('data', (n) => {
      if (n.outTradeId !== orderId) return;
      clearTimeout(timer);
      resolve(n);
    });
    stream.on('error', (e) => {
      if (e.code !== grpc.status.CANCELLED) reject(e);
    });
  });
  await new Promise((r) => setTimeout(r, 300));
  const paid = await fetch(`http://${sandbox}/sandbox/orders/${orderId}/pay`, { method: 'POST' });
  console.log(`sandbox pays: ${await paid.text()}`);

  const notification = await received;
  check(notification.outTradeId === orderId && notification.paid, 'the paid notification of our order');
  check(notification.amountFen === '20' && notification.tradeAmount === '0.20', 'the amount');
  // Ship goods only on a payment of the order this gateway created, for its amount.
  check(notification.orderCheck === 'ORDER_CHECK_MATCHED', 'the payment matches our order');
  console.log(`notification ${notification.sequence}: ${orderId} paid ${notification.tradeAmount} yuan`);
  stream.cancel();

  const acked = await call(payment, 'AckNotifications', { consumer: 'node-example', sequence: notification.sequence });
  check(BigInt(acked.ackedSequence) >= BigInt(notification.sequence), 'the acknowledgement');
  console.log(`acknowledged up to ${acked.ackedSequence}`);

  // The same event reaches the work queue: a worker fetches (waiting up to
  // 5 s), processes (idempotently: a delivery_count above 1 means an
  // earlier worker did not ack in time) and acks each event.
  let worked = null;
  for (const deadline = Date.now() + 15_000; !worked && Date.now() < deadline; ) {
    const batch = await call(payment, 'FetchNotifications', {
      consumer: 'node-worker',
      maxEvents: 10,
      wait: { seconds: 5 },
    });
    for (const event of batch.events) {
      const n = event.notification;
      if (n.outTradeId === orderId && n.orderCheck === 'ORDER_CHECK_MATCHED') worked = n;
      const ack = await call(payment, 'AckNotifications', { consumer: 'node-worker', sequences: [n.sequence] });
      console.log(`worker: event ${n.sequence} (delivery ${event.deliveryCount}) acked, newly ${ack.newlyAcked}`);
    }
  }
  check(worked && worked.sequence === notification.sequence, 'the worker processed our payment');

  try {
    await call(payment, 'CreateJsapiOrder', { outTradeId: `${orderId}X`, amountFen: 0, openid: 'oNodeExample' });
    check(false, 'an invalid amount is refused');
  } catch (err) {
    check(err.code === grpc.status.INVALID_ARGUMENT, `INVALID_ARGUMENT, not ${err.code}`);
    const fields = badRequestFields(err);
    check(fields.length === 1 && fields[0] === 'amount_fen', `the violation names amount_fen, not ${fields}`);
  }

  console.log('node example: OK');
  auth.close();
  ticket.close();
  payment.close();
}

main().catch((err) => {
  console.error(`FAILED: ${err.stack || err}`);
  process.exit(1);
});

// A kongtie-gateway client in Java (grpc-java, the classes generated into
// gen/java by proto/buf.gen.yaml: package com.kongtie.v1).
//
// Gets the access token, signs a JS-SDK config, creates an order,
// subscribes to payment notifications, has the sandbox pay the order,
// receives the notification and acknowledges it, processes it again as a
// worker of a work-queue consumer (fetch, then ack), then decodes a rich
// error to its field name. Exits non-zero on any wrong answer.
//
//   bash examples/java/run.sh --grpc 127.0.0.1:50051 --sandbox 127.0.0.1:8090
package com.kongtie.examples;

import com.google.protobuf.Any;
import com.google.protobuf.Duration;
import com.google.protobuf.InvalidProtocolBufferException;
import com.google.rpc.BadRequest;
import com.kongtie.v1.AckNotificationsRequest;
import com.kongtie.v1.AckNotificationsResponse;
import com.kongtie.v1.AuthGrpc;
import com.kongtie.v1.Consumer;
import com.kongtie.v1.CreateConsumerRequest;
import com.kongtie.v1.CreateJsapiOrderRequest;
import com.kongtie.v1.CreateJsapiOrderResponse;
import com.kongtie.v1.DeliverPolicy;
import com.kongtie.v1.FetchNotificationsRequest;
import com.kongtie.v1.FetchNotificationsResponse;
import com.kongtie.v1.GetAccessTokenRequest;
import com.kongtie.v1.GetAccessTokenResponse;
import com.kongtie.v1.GetConsumerRequest;
import com.kongtie.v1.GetJsApiTicketRequest;
import com.kongtie.v1.LeasedNotification;
import com.kongtie.v1.OrderCheck;
import com.kongtie.v1.PaymentGrpc;
import com.kongtie.v1.PaymentNotification;
import com.kongtie.v1.SignJsSdkConfigRequest;
import com.kongtie.v1.SignJsSdkConfigResponse;
import com.kongtie.v1.SubscribeNotificationsRequest;
import com.kongtie.v1.TicketGrpc;
import io.grpc.Channel;
import io.grpc.ClientInterceptors;
import io.grpc.Context;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.protobuf.StatusProto;
import io.grpc.stub.MetadataUtils;
import io.grpc.stub.StreamObserver;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.util.ArrayList;
import java.util.HexFormat;
import java.util.List;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.TimeUnit;

public final class Client {
  private Client() {}

  private static void check(boolean condition, String what) {
    if (!condition) {
      System.err.println("FAILED: " + what);
      System.exit(1);
    }
  }

  private static String arg(String[] args, String name, String fallback) {
    for (int i = 0; i + 1 < args.length; i++) {
      if (args[i].equals("--" + name)) {
        return args[i + 1];
      }
    }
    return fallback;
  }

  public static void main(String[] args) throws Exception {
    String grpcAddr = arg(args, "grpc", "127.0.0.1:50051");
    String sandbox = arg(args, "sandbox", "127.0.0.1:8090");
    String apiKey = arg(args, "api-key", System.getenv("KONGTIE_API_KEY"));

    // Plaintext to a gateway on this machine; in production, TLS
    // (ManagedChannelBuilder.forTarget(...) without usePlaintext()).
    ManagedChannel managed = ManagedChannelBuilder.forTarget(grpcAddr).usePlaintext().build();
    // Every call carries the API key, when there is one.
    Metadata headers = new Metadata();
    if (apiKey != null && !apiKey.isEmpty()) {
      headers.put(Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER), "Bearer " + apiKey);
    }
    Channel channel =
        ClientInterceptors.intercept(managed, MetadataUtils.newAttachHeadersInterceptor(headers));
    // Each call gets a deadline of its own: a stub's deadline is fixed when
    // the stub is made, so a fresh one per call.
    var auth = AuthGrpc.newBlockingStub(channel);
    var ticket = TicketGrpc.newBlockingStub(channel);
    var payment = PaymentGrpc.newBlockingStub(channel);

    GetAccessTokenResponse token =
        auth.withDeadlineAfter(10, TimeUnit.SECONDS)
            .getAccessToken(GetAccessTokenRequest.getDefaultInstance());
    check(!token.getAccessToken().isEmpty(), "an access token");
    System.out.printf(
        "access token: %d characters, fetched %s%n",
        token.getAccessToken().length(),
        java.time.Instant.ofEpochSecond(token.getFetchedAt().getSeconds()));

    String page = "https://shop.example.com/pay?order=1";
    SignJsSdkConfigResponse config =
        ticket.withDeadlineAfter(10, TimeUnit.SECONDS)
            .signJsSdkConfig(SignJsSdkConfigRequest.newBuilder().setUrl(page + "#top").build());
    String jsapi =
        ticket.withDeadlineAfter(10, TimeUnit.SECONDS)
            .getJsApiTicket(GetJsApiTicketRequest.getDefaultInstance())
            .getTicket();
    String plain =
        "jsapi_ticket=" + jsapi + "&noncestr=" + config.getNonceStr() + "&timestamp="
            + config.getTimestamp() + "&url=" + page;
    String expected =
        HexFormat.of()
            .formatHex(
                MessageDigest.getInstance("SHA-1").digest(plain.getBytes(StandardCharsets.UTF_8)));
    check(config.getSignature().equals(expected), "the wx.config signature verifies");
    System.out.printf("wx.config: appId=%s signature verified%n", config.getAppId());

    String orderId = "JAVA" + (System.currentTimeMillis() % 1_000_000_000_000L);
    CreateJsapiOrderResponse order =
        payment
            .withDeadlineAfter(10, TimeUnit.SECONDS)
            .createJsapiOrder(
                CreateJsapiOrderRequest.newBuilder()
                    .setOutTradeId(orderId)
                    .setAmountFen(20)
                    .setOpenid("oJavaExample")
                    .build());
    check(order.getPayParams().getPackage().startsWith("prepay_id="), "pay parameters");
    System.out.printf("order %s: %s%n", orderId, order.getPayParams().getPackage());

    // A work-queue consumer, created once (again at every worker's start is
    // a no-op): workers on any replica share its events.
    payment
        .withDeadlineAfter(10, TimeUnit.SECONDS)
        .createConsumer(
            CreateConsumerRequest.newBuilder()
                .setName("java-worker")
                .setDeliverPolicy(DeliverPolicy.DELIVER_POLICY_NEW)
                .setAckWait(Duration.newBuilder().setSeconds(30))
                .build());

    // Subscribe as a durable cursor consumer before paying. A consumer sees
    // every event (its acknowledgement covers all before it), so other
    // orders' events are skipped here, not filtered away.
    CompletableFuture<PaymentNotification> received = new CompletableFuture<>();
    Context.CancellableContext subscription = Context.current().withCancellation();
    subscription.run(
        () ->
            PaymentGrpc.newStub(channel)
                
                .withDeadlineAfter(15, TimeUnit.SECONDS)
                .subscribeNotifications(
                    SubscribeNotificationsRequest.newBuilder().setConsumer("java-example").build(),
                    new StreamObserver<PaymentNotification>() {
                      @Override
                      public void onNext(PaymentNotification n) {
                        if (n.getOutTradeId().equals(orderId)) {
                          received.complete(n);
                        }
                      }

                      @Override
                      public void onError(Throwable t) {
                        received.completeExceptionally(t);
                      }

                      @Override
                      public void onCompleted() {
                        received.completeExceptionally(
                            new IllegalStateException("the stream ended"));
                      }
                    }));
    // Give the subscription a moment to be in place before the payment.
    Thread.sleep(300);

    HttpClient http = HttpClient.newBuilder().connectTimeout(java.time.Duration.ofSeconds(10)).build();
    HttpResponse<String> paid =
        http.send(
            HttpRequest.newBuilder(URI.create("http://" + sandbox + "/sandbox/orders/" + orderId + "/pay"))
                .timeout(java.time.Duration.ofSeconds(10))
                .POST(HttpRequest.BodyPublishers.noBody())
                .build(),
            HttpResponse.BodyHandlers.ofString());
    check(paid.statusCode() / 100 == 2, "the sandbox pays, not HTTP " + paid.statusCode());
    System.out.printf("sandbox pays: %s%n", paid.body().strip());

    PaymentNotification notification = received.get(15, TimeUnit.SECONDS);
    subscription.cancel(null);
    check(
        notification.getPaid()
            && notification.hasAmountFen()
            && notification.getAmountFen() == 20
            && notification.getTradeAmount().equals("0.20"),
        "the paid notification of our order, for its amount");
    // Ship goods only on a payment of the order this gateway created, for its amount.
    check(
        notification.getOrderCheck() == OrderCheck.ORDER_CHECK_MATCHED,
        "the payment matches our order, not " + notification.getOrderCheck());
    System.out.printf(
        "notification %d: %s paid %s yuan%n",
        notification.getSequence(), orderId, notification.getTradeAmount());

    AckNotificationsResponse acked =
        payment
            .withDeadlineAfter(10, TimeUnit.SECONDS)
            .ackNotifications(
                AckNotificationsRequest.newBuilder()
                    .setConsumer("java-example")
                    .setSequence(notification.getSequence())
                    .build());
    check(acked.getAckedSequence() >= notification.getSequence(), "the acknowledgement");
    System.out.printf("acknowledged up to %d%n", acked.getAckedSequence());

    // The same event reaches the work queue: a worker fetches (waiting up to
    // 5 s), processes (idempotently: a delivery_count above 1 means an
    // earlier worker did not ack in time) and acks each event.
    PaymentNotification worked = null;
    long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(15);
    while (worked == null && System.nanoTime() < deadline) {
      FetchNotificationsResponse batch =
          payment
              .withDeadlineAfter(10, TimeUnit.SECONDS)
              .fetchNotifications(
                  FetchNotificationsRequest.newBuilder()
                      .setConsumer("java-worker")
                      .setMaxEvents(10)
                      .setWait(Duration.newBuilder().setSeconds(5))
                      .build());
      for (LeasedNotification event : batch.getEventsList()) {
        PaymentNotification n = event.getNotification();
        if (n.getOutTradeId().equals(orderId) && n.getOrderCheck() == OrderCheck.ORDER_CHECK_MATCHED) {
          worked = n;
        }
        AckNotificationsResponse ack =
            payment
                .withDeadlineAfter(10, TimeUnit.SECONDS)
                .ackNotifications(
                    AckNotificationsRequest.newBuilder()
                        .setConsumer("java-worker")
                        .addSequences(n.getSequence())
                        .build());
        System.out.printf(
            "worker: event %d (delivery %d) acked, newly %d%n",
            n.getSequence(), event.getDeliveryCount(), ack.getNewlyAcked());
      }
    }
    check(
        worked != null && worked.getSequence() == notification.getSequence(),
        "the worker processed our payment");

    Consumer consumer =
        payment
            .withDeadlineAfter(10, TimeUnit.SECONDS)
            .getConsumer(GetConsumerRequest.newBuilder().setName("java-worker").build())
            .getConsumer();
    check(consumer.getPending() == 0, "nothing left pending");
    System.out.printf(
        "consumer java-worker: acked up to %d, lag %d%n",
        consumer.getAckedSequence(), consumer.getLag());

    // A rich error: an invalid amount names its field in google.rpc.BadRequest.
    List<String> fields = new ArrayList<>();
    try {
      payment
          .withDeadlineAfter(10, TimeUnit.SECONDS)
          .createJsapiOrder(
              CreateJsapiOrderRequest.newBuilder()
                  .setOutTradeId(orderId + "X")
                  .setAmountFen(0)
                  .setOpenid("oJavaExample")
                  .build());
      check(false, "an invalid amount is refused");
    } catch (StatusRuntimeException e) {
      check(
          e.getStatus().getCode() == Status.Code.INVALID_ARGUMENT,
          "INVALID_ARGUMENT, not " + e.getStatus().getCode());
      com.google.rpc.Status status = StatusProto.fromThrowable(e);
      check(status != null, "the error carries google.rpc.Status details");
      for (Any detail : status.getDetailsList()) {
        if (detail.is(BadRequest.class)) {
          try {
            for (BadRequest.FieldViolation v : detail.unpack(BadRequest.class).getFieldViolationsList()) {
              System.out.printf("rich error: field %s: %s%n", v.getField(), v.getDescription());
              fields.add(v.getField());
            }
          } catch (InvalidProtocolBufferException bad) {
            check(false, "a readable BadRequest: " + bad);
          }
        }
      }
    }
    check(fields.equals(List.of("amount_fen")), "the violation names amount_fen, not " + fields);

    managed.shutdown().awaitTermination(5, TimeUnit.SECONDS);
    System.out.println("java example: OK");
  }
}

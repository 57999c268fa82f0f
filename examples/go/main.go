// A kongtie-gateway client in Go (google.golang.org/grpc, the generated
// package github.com/kongtie/kongtie-gateway/gen/go/kongtie/v1).
//
// Gets the access token, signs a JS-SDK config, creates an order,
// subscribes to payment notifications, has the sandbox pay the order,
// receives the notification and acknowledges it, processes it again as a
// worker of a work-queue consumer (fetch, then ack), then decodes a rich
// error to its field name. Exits non-zero on any wrong answer.
//
//	go run . --grpc 127.0.0.1:50051 --sandbox 127.0.0.1:8090
package main

import (
	"context"
	"crypto/sha1"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	kongtiev1 "github.com/kongtie/kongtie-gateway/gen/go/kongtie/v1"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
)

func check(condition bool, format string, args ...interface{}) {
	if !condition {
		fmt.Fprintf(os.Stderr, "FAILED: "+format+"\n", args...)
		os.Exit(1)
	}
}

func must(err error, what string) {
	check(err == nil, "%s: %v", what, err)
}

func main() {
	grpcAddr := flag.String("grpc", "127.0.0.1:50051", "the gateway's gRPC address")
	sandbox := flag.String("sandbox", "127.0.0.1:8090", "the sandbox upstream's address")
	apiKey := flag.String("api-key", os.Getenv("KONGTIE_API_KEY"), "an API key, when the gateway has keys")
	flag.Parse()

	// Plaintext to a gateway on this machine; with grpc-go 1.34 or later
	// the same is grpc.WithTransportCredentials(insecure.NewCredentials()),
	// and in production, TLS credentials.
	conn, err := grpc.Dial(*grpcAddr, grpc.WithInsecure())
	must(err, "dial")
	defer conn.Close()
	auth := kongtiev1.NewAuthClient(conn)
	ticket := kongtiev1.NewTicketClient(conn)
	payment := kongtiev1.NewPaymentClient(conn)

	// Every call carries the API key (when there is one) and a deadline.
	call := func() (context.Context, context.CancelFunc) {
		ctx := context.Background()
		if *apiKey != "" {
			ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+*apiKey)
		}
		return context.WithTimeout(ctx, 10*time.Second)
	}

	ctx, cancel := call()
	token, err := auth.GetAccessToken(ctx, &kongtiev1.GetAccessTokenRequest{})
	cancel()
	must(err, "GetAccessToken")
	check(token.AccessToken != "", "an access token")
	fmt.Printf("access token: %d characters, fetched %s\n", len(token.AccessToken), token.FetchedAt.AsTime().Format(time.RFC3339))

	page := "https://shop.example.com/pay?order=1"
	ctx, cancel = call()
	config, err := ticket.SignJsSdkConfig(ctx, &kongtiev1.SignJsSdkConfigRequest{Url: page + "#top"})
	must(err, "SignJsSdkConfig")
	jsapi, err := ticket.GetJsApiTicket(ctx, &kongtiev1.GetJsApiTicketRequest{})
	cancel()
	must(err, "GetJsApiTicket")
	sum := sha1.Sum([]byte(fmt.Sprintf("jsapi_ticket=%s&noncestr=%s&timestamp=%d&url=%s",
		jsapi.Ticket, config.NonceStr, config.Timestamp, page)))
	check(config.Signature == hex.EncodeToString(sum[:]), "the wx.config signature verifies")
	fmt.Printf("wx.config: appId=%s signature verified\n", config.AppId)

	orderID := fmt.Sprintf("GO%d", time.Now().UnixMilli()%1_000_000_000_000)
	ctx, cancel = call()
	order, err := payment.CreateJsapiOrder(ctx, &kongtiev1.CreateJsapiOrderRequest{
		OutTradeId: orderID, AmountFen: 20, Openid: "oGoExample",
	})
	cancel()
	must(err, "CreateJsapiOrder")
	check(strings.HasPrefix(order.PayParams.Package, "prepay_id="), "pay parameters")
	fmt.Printf("order %s: %s\n", orderID, order.PayParams.Package)

	// A work-queue consumer, created once (again at every worker's start is
	// a no-op): workers on any replica share its events.
	ctx, cancel = call()
	_, err = payment.CreateConsumer(ctx, &kongtiev1.CreateConsumerRequest{
		Name:          "go-worker",
		DeliverPolicy: kongtiev1.DeliverPolicy_DELIVER_POLICY_NEW,
		AckWait:       durationpb.New(30 * time.Second),
	})
	cancel()
	must(err, "CreateConsumer")

	// Subscribe as a durable cursor consumer before paying. A consumer sees
	// every event (its acknowledgement covers all before it), so other
	// orders' events are skipped here, not filtered away.
	streamCtx, stopStream := context.WithTimeout(context.Background(), 15*time.Second)
	defer stopStream()
	if *apiKey != "" {
		streamCtx = metadata.AppendToOutgoingContext(streamCtx, "authorization", "Bearer "+*apiKey)
	}
	stream, err := payment.SubscribeNotifications(streamCtx, &kongtiev1.SubscribeNotificationsRequest{Consumer: "go-example"})
	must(err, "SubscribeNotifications")
	received := make(chan *kongtiev1.PaymentNotification, 1)
	streamErr := make(chan error, 1)
	go func() {
		for {
			n, err := stream.Recv()
			if err != nil {
				streamErr <- err
				return
			}
			if n.OutTradeId == orderID {
				received <- n
				return
			}
		}
	}()
	// Give the subscription a moment to be in place before the payment.
	time.Sleep(300 * time.Millisecond)

	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Post(fmt.Sprintf("http://%s/sandbox/orders/%s/pay", *sandbox, orderID), "application/json", nil)
	must(err, "the sandbox pays")
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	fmt.Printf("sandbox pays: %s\n", strings.TrimSpace(string(body)))

	var notification *kongtiev1.PaymentNotification
	select {
	case notification = <-received:
	case err := <-streamErr:
		check(false, "the stream ended before our notification: %v", err)
	}
	stopStream()
	check(notification.Paid && notification.AmountFen != nil && *notification.AmountFen == 20 &&
		notification.TradeAmount == "0.20", "the paid notification of our order, for its amount")
	// Ship goods only on a payment of the order this gateway created, for its amount.
	check(notification.OrderCheck == kongtiev1.OrderCheck_ORDER_CHECK_MATCHED, "the payment matches our order, not %v", notification.OrderCheck)
	fmt.Printf("notification %d: %s paid %s yuan\n", notification.Sequence, orderID, notification.TradeAmount)

	ctx, cancel = call()
	acked, err := payment.AckNotifications(ctx, &kongtiev1.AckNotificationsRequest{Consumer: "go-example", Sequence: notification.Sequence})
	cancel()
	must(err, "AckNotifications (cursor)")
	check(acked.AckedSequence >= notification.Sequence, "the acknowledgement")
	fmt.Printf("acknowledged up to %d\n", acked.AckedSequence)

	// The same event reaches the work queue: a worker fetches (waiting up
	// to 5 s), processes (idempotently: a delivery_count above 1 means an
	// earlier worker did not ack in time) and acks each event.
	var worked *kongtiev1.PaymentNotification
	for deadline := time.Now().Add(15 * time.Second); worked == nil && time.Now().Before(deadline); {
		ctx, cancel = call()
		batch, err := payment.FetchNotifications(ctx, &kongtiev1.FetchNotificationsRequest{
			Consumer: "go-worker", MaxEvents: 10, Wait: durationpb.New(5 * time.Second),
		})
		cancel()
		must(err, "FetchNotifications")
		for _, event := range batch.Events {
			n := event.Notification
			if n.OutTradeId == orderID && n.OrderCheck == kongtiev1.OrderCheck_ORDER_CHECK_MATCHED {
				worked = n
			}
			ctx, cancel = call()
			ack, err := payment.AckNotifications(ctx, &kongtiev1.AckNotificationsRequest{Consumer: "go-worker", Sequences: []uint64{n.Sequence}})
			cancel()
			must(err, "AckNotifications (work queue)")
			fmt.Printf("worker: event %d (delivery %d) acked, newly %d\n", n.Sequence, event.DeliveryCount, ack.NewlyAcked)
		}
	}
	check(worked != nil && worked.Sequence == notification.Sequence, "the worker processed our payment")

	ctx, cancel = call()
	consumer, err := payment.GetConsumer(ctx, &kongtiev1.GetConsumerRequest{Name: "go-worker"})
	cancel()
	must(err, "GetConsumer")
	check(consumer.Consumer.Pending == 0, "nothing left pending")
	fmt.Printf("consumer go-worker: acked up to %d, lag %d\n", consumer.Consumer.AckedSequence, consumer.Consumer.Lag)

	// A rich error: an invalid amount names its field in google.rpc.BadRequest.
	ctx, cancel = call()
	_, err = payment.CreateJsapiOrder(ctx, &kongtiev1.CreateJsapiOrderRequest{
		OutTradeId: orderID + "X", AmountFen: 0, Openid: "oGoExample",
	})
	cancel()
	check(err != nil, "an invalid amount is refused")
	st := status.Convert(err)
	check(st.Code() == codes.InvalidArgument, "INVALID_ARGUMENT, not %v", st.Code())
	var fields []string
	for _, detail := range st.Details() {
		if bad, ok := detail.(*errdetails.BadRequest); ok {
			for _, v := range bad.FieldViolations {
				fmt.Printf("rich error: field %s: %s\n", v.Field, v.Description)
				fields = append(fields, v.Field)
			}
		}
	}
	check(len(fields) == 1 && fields[0] == "amount_fen", "the violation names amount_fen, not %v", fields)

	fmt.Println("go example: OK")
}

<?php
// A kongtie-gateway client in plain PHP: the Connect protocol (JSON over
// HTTP/1.1) on the gateway's gRPC port, with nothing but the curl
// extension. No gRPC extension, no generated code.
//
// Gets the access token, creates an order, has the sandbox pay it, reads
// the payment notification from the notification stream and from a work
// queue (fetch, then ack), and reads a rich error. Exits non-zero on any
// wrong answer.
//
//   php client.php --gateway 127.0.0.1:50051 --sandbox 127.0.0.1:8090 [--api-key KEY]
declare(strict_types=1);

/** A Connect error: its code (invalid_argument...), message and details. */
final class KongtieError extends RuntimeException
{
    public function __construct(
        public readonly string $errorCode,
        string $message,
        public readonly array $details,
        public readonly int $httpStatus,
    ) {
        parent::__construct("$errorCode: $message");
    }

    /** The field violations of a google.rpc.BadRequest detail, field => description. */
    public function fieldViolations(): array
    {
        $out = [];
        foreach ($this->details as $detail) {
            if (($detail['type'] ?? '') === 'google.rpc.BadRequest') {
                foreach ($detail['debug']['fieldViolations'] ?? [] as $v) {
                    $out[$v['field']] = $v['description'];
                }
            }
        }
        return $out;
    }
}

final class Kongtie
{
    public function __construct(private string $gateway, private ?string $apiKey = null)
    {
    }

    /** Calls a unary RPC, `Service/Method`, with a request as an array. */
    public function call(string $procedure, array $request = [], int $timeoutMs = 10000): array
    {
        $ch = curl_init("http://{$this->gateway}/kongtie.v1.$procedure");
        curl_setopt_array($ch, [
            CURLOPT_POST => true,
            CURLOPT_POSTFIELDS => json_encode($request ?: new stdClass(), JSON_THROW_ON_ERROR),
            CURLOPT_HTTPHEADER => $this->headers('application/json', $timeoutMs),
            CURLOPT_RETURNTRANSFER => true,
            CURLOPT_HTTP_VERSION => CURL_HTTP_VERSION_1_1,
            // A long-poll may wait up to its timeout; curl waits a little longer.
            CURLOPT_TIMEOUT_MS => $timeoutMs + 2000,
        ]);
        $body = curl_exec($ch);
        if ($body === false) {
            throw new RuntimeException('curl: ' . curl_error($ch));
        }
        $status = curl_getinfo($ch, CURLINFO_RESPONSE_CODE);
        curl_close($ch);
        $json = json_decode($body, true, 512, JSON_THROW_ON_ERROR);
        if ($status !== 200) {
            throw new KongtieError($json['code'] ?? 'unknown', $json['message'] ?? '', $json['details'] ?? [], $status);
        }
        return $json;
    }

    /**
     * Reads a server stream (`Service/Method`), calling $onMessage with each
     * message until it returns false. Returns the end-of-stream message when
     * the server ends the stream, or null when $onMessage stopped it.
     */
    public function stream(string $procedure, array $request, callable $onMessage, int $timeoutMs = 15000): ?array
    {
        $payload = json_encode($request ?: new stdClass(), JSON_THROW_ON_ERROR);
        $buffer = '';
        $end = null;
        $stopped = false;
        $ch = curl_init("http://{$this->gateway}/kongtie.v1.$procedure");
        curl_setopt_array($ch, [
            CURLOPT_POST => true,
            // One enveloped message: a flags byte, a big-endian length, the JSON.
            CURLOPT_POSTFIELDS => pack('CN', 0, strlen($payload)) . $payload,
            CURLOPT_HTTPHEADER => $this->headers('application/connect+json', $timeoutMs),
            CURLOPT_HTTP_VERSION => CURL_HTTP_VERSION_1_1,
            CURLOPT_TIMEOUT_MS => $timeoutMs + 2000,
            CURLOPT_WRITEFUNCTION => function ($ch, string $chunk) use (&$buffer, &$end, &$stopped, $onMessage): int {
                $buffer .= $chunk;
                while (strlen($buffer) >= 5) {
                    ['flags' => $flags, 'length' => $length] = unpack('Cflags/Nlength', $buffer);
                    if (strlen($buffer) < 5 + $length) {
                        break;
                    }
                    $message = json_decode(substr($buffer, 5, $length), true, 512, JSON_THROW_ON_ERROR);
                    $buffer = substr($buffer, 5 + $length);
                    if ($flags & 0x02) {
                        $end = $message;
                    } elseif ($onMessage($message) === false) {
                        $stopped = true;
                        return -1; // aborts the transfer
                    }
                }
                return strlen($chunk);
            },
        ]);
        $ok = curl_exec($ch);
        $error = curl_error($ch);
        curl_close($ch);
        if ($stopped) {
            return null;
        }
        if ($ok === false && $end === null) {
            throw new RuntimeException("curl: $error");
        }
        if (isset($end['error'])) {
            $e = $end['error'];
            throw new KongtieError($e['code'], $e['message'] ?? '', $e['details'] ?? [], 200);
        }
        return $end;
    }

    private function headers(string $contentType, int $timeoutMs): array
    {
        $headers = [
            "Content-Type: $contentType",
            'Connect-Protocol-Version: 1',
            "Connect-Timeout-Ms: $timeoutMs",
        ];
        if ($this->apiKey !== null && $this->apiKey !== '') {
            $headers[] = "Authorization: Bearer {$this->apiKey}";
        }
        return $headers;
    }
}

function check(bool $condition, string $what): void
{
    if (!$condition) {
        fwrite(STDERR, "FAILED: $what\n");
        exit(1);
    }
}

$options = getopt('', ['gateway:', 'sandbox:', 'api-key:']);
$gateway = $options['gateway'] ?? '127.0.0.1:50051';
$sandbox = $options['sandbox'] ?? '127.0.0.1:8090';
$kongtie = new Kongtie($gateway, $options['api-key'] ?? (getenv('KONGTIE_API_KEY') ?: null));

$token = $kongtie->call('Auth/GetAccessToken');
check(strlen($token['accessToken']) > 0, 'an access token');
echo 'access token: ', strlen($token['accessToken']), " characters (Connect JSON, HTTP/1.1)\n";

// A work queue, created once (again is a no-op), from new events on.
$kongtie->call('Payment/CreateConsumer', ['name' => 'php-worker', 'deliverPolicy' => 'DELIVER_POLICY_NEW', 'ackWait' => '30s']);

$orderId = 'PHP' . substr((string) hrtime(true), -12);
// int64 fields travel as strings in protobuf JSON: an amount is never a float.
$order = $kongtie->call('Payment/CreateJsapiOrder', ['outTradeId' => $orderId, 'amountFen' => '20', 'openid' => 'oPhpExample']);
check(str_starts_with($order['payParams']['package'], 'prepay_id='), 'pay parameters');
echo "order $orderId: {$order['payParams']['package']}\n";

$ch = curl_init("http://$sandbox/sandbox/orders/$orderId/pay");
curl_setopt_array($ch, [CURLOPT_POST => true, CURLOPT_RETURNTRANSFER => true, CURLOPT_TIMEOUT => 10]);
echo 'sandbox pays: ', curl_exec($ch), "\n";
curl_close($ch);

// The notification stream, replayed from the start until our order's event.
$streamed = null;
$kongtie->stream('Payment/SubscribeNotifications', ['afterSequence' => '0'], function (array $n) use ($orderId, &$streamed): bool {
    if ($n['outTradeId'] === $orderId) {
        $streamed = $n;
        return false;
    }
    return true;
});
check($streamed !== null && $streamed['paid'] === true && $streamed['amountFen'] === '20', 'the paid notification, 20 fen');
check($streamed['orderCheck'] === 'ORDER_CHECK_MATCHED', 'the payment matches our order');
echo "stream: notification {$streamed['sequence']}: $orderId paid {$streamed['tradeAmount']} yuan\n";

// The same event from the work queue: fetch (waiting up to 5 s), process, ack.
$worked = null;
for ($deadline = time() + 15; $worked === null && time() < $deadline;) {
    $batch = $kongtie->call('Payment/FetchNotifications', ['consumer' => 'php-worker', 'maxEvents' => 10, 'wait' => '5s'], 8000);
    foreach ($batch['events'] ?? [] as $event) {
        $n = $event['notification'];
        if ($n['outTradeId'] === $orderId) {
            $worked = $n;
        }
        $ack = $kongtie->call('Payment/AckNotifications', ['consumer' => 'php-worker', 'sequences' => [$n['sequence']]]);
        echo "worker: event {$n['sequence']} (delivery {$event['deliveryCount']}) acked, newly ", $ack['newlyAcked'] ?? 0, "\n";
    }
}
check($worked !== null && $worked['sequence'] === $streamed['sequence'], 'the worker fetched our payment');

try {
    $kongtie->call('Payment/CreateJsapiOrder', ['outTradeId' => $orderId . 'X', 'amountFen' => '0', 'openid' => 'oPhpExample']);
    check(false, 'an invalid amount is refused');
} catch (KongtieError $e) {
    check($e->errorCode === 'invalid_argument' && $e->httpStatus === 400, "invalid_argument, not {$e->errorCode}");
    $violations = $e->fieldViolations();
    check(array_keys($violations) === ['amount_fen'], 'the violation names amount_fen');
    echo "rich error: amount_fen: {$violations['amount_fen']}\n";
}
echo "php example: OK\n";

package cape.sdk;

import cape.crypto.Hpke;
import cape.crypto.ResultChannel;
import cape.errors.CapeException;
import cape.errors.ChecksumMismatchException;
import cape.errors.FormatException;
import cape.errors.FunctionException;
import cape.errors.TransportException;
import cape.errors.VerificationException;
import cape.verify.AttestationDocument;
import cape.verify.Policy;
import cape.verify.Verifier;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonPrimitive;
import java.io.ByteArrayOutputStream;
import java.net.URI;
import java.net.http.HttpResponse;
import java.net.http.WebSocket;
import java.net.http.WebSocketHandshakeException;
import java.nio.ByteBuffer;
import java.nio.charset.CharacterCodingException;
import java.nio.charset.CodingErrorAction;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.security.SecureRandom;
import java.time.Duration;
import java.util.HexFormat;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.CompletionStage;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import org.bouncycastle.crypto.params.X25519PrivateKeyParameters;

/**
 * One attested websocket session (mirrors {@code cape.sdk.session.Session}).
 *
 * <p>Verification happens before anything secret is sent: the document must chain to the pinned
 * root, carry this session's nonce, match the pinned PCRs and function checksum, and bind this
 * client's response key, so that results come back sealed to it. Anything else ends the session
 * with a {@link CapeException}: the client fails closed.
 */
final class Session implements AutoCloseable {
    static final String SUBPROTOCOL = "cape.runtime";
    static final int NONCE_BYTES = 16;
    static final Duration OPEN_TIMEOUT = Duration.ofSeconds(30);
    static final Duration CLOSE_TIMEOUT = Duration.ofSeconds(5);
    private static final String NOT_BOUND =
            "the enclave did not bind this session's response key; refusing to continue";
    private static final long MAX_FRAME_BYTES = 256L << 20;
    private static final SecureRandom RANDOM = new SecureRandom();

    private final WebSocket ws;
    private final Frames frames;
    private final Options options;
    private AttestationDocument document;
    private JsonObject userData;
    private ResultChannel channel;
    private long replies;
    private boolean closed;

    private Session(WebSocket ws, Frames frames, Options options) {
        this.ws = ws;
        this.frames = frames;
        this.options = options;
    }

    /** Connect, send a fresh nonce (and response key), verify the returned document. */
    static Session open(String path, Options options) {
        URI uri = wsUri(options.url(), path);
        Frames frames = new Frames();
        WebSocket ws;
        try {
            WebSocket.Builder builder = options.http().newWebSocketBuilder().connectTimeout(OPEN_TIMEOUT);
            try {
                builder.subprotocols(SUBPROTOCOL, options.token());
            } catch (IllegalArgumentException e) {
                throw new FormatException("the token is not a valid websocket subprotocol value");
            }
            ws = builder.buildAsync(uri, frames).get(OPEN_TIMEOUT.toSeconds() + 5, TimeUnit.SECONDS);
        } catch (ExecutionException e) {
            throw refusalOrUnreachable(options.url(), e.getCause());
        } catch (TimeoutException e) {
            throw new TransportException("cannot reach the Cape server at " + options.url() + ": timed out");
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new TransportException("interrupted while connecting to " + options.url());
        }
        Session session = new Session(ws, frames, options);
        try {
            if (!SUBPROTOCOL.equals(ws.getSubprotocol())) {
                throw new TransportException("cannot reach the Cape server at " + options.url()
                        + ": the server did not select the " + SUBPROTOCOL + " subprotocol");
            }
            session.attest();
            return session;
        } catch (RuntimeException e) {
            session.close();
            throw e;
        }
    }

    static URI wsUri(String url, String path) {
        String base;
        if (url.startsWith("https://")) {
            base = "wss://" + url.substring("https://".length());
        } else if (url.startsWith("wss://")) {
            base = url;
        } else {
            int colon = url.indexOf(':');
            throw new FormatException("the server URL must use https://, not "
                    + (colon < 0 ? url : url.substring(0, colon)) + "://");
        }
        try {
            return URI.create(base.replaceAll("/+$", "") + path);
        } catch (IllegalArgumentException e) {
            throw new FormatException("the server URL is not a valid URL");
        }
    }

    private static CapeException refusalOrUnreachable(String url, Throwable cause) {
        if (cause instanceof WebSocketHandshakeException handshake
                && handshake.getResponse() != null
                && handshake.getResponse().statusCode() != 101) {
            HttpResponse<?> response = handshake.getResponse();
            int status = response.statusCode();
            Object body = response.body();
            String text = body instanceof String s ? Rest.refusalText(s)
                    : body instanceof byte[] b ? Rest.refusalText(new String(b, StandardCharsets.UTF_8)) : null;
            String message = "the server refused the session (" + status + "): "
                    + (text == null || text.isEmpty() ? "no reason given" : text);
            return Rest.refused(message, text == null ? "" : text, status);
        }
        String detail = cause == null ? "unknown error" : String.valueOf(cause.getMessage());
        return new TransportException("cannot reach the Cape server at " + url + ": " + detail);
    }

    private void attest() {
        byte[] nonce = new byte[NONCE_BYTES];
        RANDOM.nextBytes(nonce);
        X25519PrivateKeyParameters responseKey = options.sealResults() ? ResultChannel.responseKey() : null;
        byte[] responsePublic = responseKey == null ? null : responseKey.generatePublicKey().getEncoded();
        Map<String, Object> start = new LinkedHashMap<>();
        start.put("nonce", Json.b64(nonce));
        if (responsePublic != null) {
            start.put("response_key", Json.b64(responsePublic));
        }
        sendJson(start);
        JsonObject message = messageOf(receiveFrame());
        JsonElement type = message.get("type");
        if (type != null && !type.isJsonNull() && !"attestation_doc".equals(Json.string(type))) {
            throw new FormatException("expected an attestation document, got " + Json.repr(type));
        }
        byte[] raw = Json.b64(message.get("message"), "attestation document");
        document = Verifier.verify(raw, options.root(), options.clock().get(),
                Policy.live(nonce, options.pcrs()));
        userData = userData(document);
        if (responseKey != null) {
            if (!userData.has("response_key_sha256")) {
                throw new VerificationException(NOT_BOUND);
            }
            byte[] bound = Json.b64(userData.get("response_key_sha256"), "response key binding");
            if (!MessageDigest.isEqual(bound, sha256(responsePublic))) {
                throw new VerificationException(NOT_BOUND);
            }
            byte[] sessionKey = document.publicKey();
            if (sessionKey == null) {
                throw new VerificationException("the attestation document carries no session key");
            }
            channel = ResultChannel.forClient(responseKey, sessionKey);
        }
        if (options.checksum() != null) {
            if (!userData.has("func_checksum")) {
                throw new ChecksumMismatchException(
                        "the enclave attests no function checksum, but one was pinned");
            }
            String got = HexFormat.of().formatHex(
                    Json.b64(userData.get("func_checksum"), "function checksum"));
            String want = options.checksum().toLowerCase(java.util.Locale.ROOT);
            if (!MessageDigest.isEqual(got.getBytes(StandardCharsets.US_ASCII),
                    want.getBytes(StandardCharsets.US_ASCII))) {
                throw new ChecksumMismatchException(
                        "function checksum does not match: got " + got + ", want " + want);
            }
        }
    }

    private static JsonObject userData(AttestationDocument document) {
        byte[] data = document.userData();
        if (data == null) {
            return new JsonObject();
        }
        String text;
        try {
            text = StandardCharsets.UTF_8.newDecoder()
                    .onMalformedInput(CodingErrorAction.REPORT)
                    .onUnmappableCharacter(CodingErrorAction.REPORT)
                    .decode(ByteBuffer.wrap(data)).toString();
        } catch (CharacterCodingException e) {
            throw new FormatException("the document's user_data is not JSON");
        }
        JsonElement parsed = Json.parse(text);
        if (parsed == null) {
            throw new FormatException("the document's user_data is not JSON");
        }
        if (!parsed.isJsonObject()) {
            throw new FormatException("the document's user_data is not a JSON object");
        }
        return parsed.getAsJsonObject();
    }

    static byte[] sha256(byte[] data) {
        try {
            return MessageDigest.getInstance("SHA-256").digest(data);
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException(e);
        }
    }

    AttestationDocument document() {
        return document;
    }

    JsonObject userData() {
        return userData;
    }

    /** Send one input, HPKE-sealed to the attested key; return the function's output. */
    byte[] invoke(byte[] data) {
        sendSealed(data);
        return receiveResult();
    }

    /** The reply to the oldest unanswered input (opened if it was sealed). */
    byte[] receiveResult() {
        JsonObject parsed = receiveFrame();
        long sequence = replies++;
        if (Json.truthy(parsed.get("error"))) {
            String sealed = Json.string(parsed.get("sealed"));
            if (channel != null && sealed != null) {
                byte[] details = channel.open(sequence, Json.b64(sealed, "sealed error"), ResultChannel.ERROR);
                throw new FunctionException(new String(details, StandardCharsets.UTF_8));
            }
            throw new FunctionException(Json.str(parsed.get("error")));
        }
        JsonObject message = messageOf(parsed);
        JsonElement type = message.get("type");
        if (!"function_result".equals(Json.string(type))) {
            throw new FormatException("expected a function result, got " + Json.repr(type));
        }
        byte[] output = Json.b64(message.get("message"), "function result");
        if (channel == null) {
            return output;
        }
        JsonElement encrypted = message.get("encrypted");
        if (!(encrypted instanceof JsonPrimitive p && p.isBoolean() && p.getAsBoolean())) {
            throw new VerificationException("the result came back unsealed although sealing was bound");
        }
        return channel.open(sequence, output, ResultChannel.RESULT);
    }

    /** One binary frame: {@code data} HPKE-sealed to the document's key. */
    void sendSealed(byte[] data) {
        byte[] key = document.publicKey();
        if (key == null) {
            throw new VerificationException("the attestation document carries no session key");
        }
        sendBytes(Hpke.seal(key, data));
    }

    void sendJson(Map<String, Object> message) {
        Map<String, Object> frame = Map.of("message", message);
        await(ws.sendText(Json.write(frame), true));
    }

    void sendBytes(byte[] data) {
        await(ws.sendBinary(ByteBuffer.wrap(data), true));
    }

    /** The next {@code {"message": …}} (an {@code {"error"}} frame raises FunctionException). */
    JsonObject receive() {
        return messageOf(receiveFrame());
    }

    private void await(CompletionStage<WebSocket> sent) {
        try {
            sent.toCompletableFuture().get(options.timeout().toMillis(), TimeUnit.MILLISECONDS);
        } catch (ExecutionException | TimeoutException e) {
            Frames.Event pending = frames.events.peek();
            if (pending instanceof Frames.Closed c) {
                throw closeError(c.code(), c.reason());
            }
            // The server answered and closed while this side was still sending (e.g. it refused
            // a deploy after its first frame): the answer, queued before the close, is the error.
            if (pending instanceof Frames.Text t && Json.parse(t.text()) instanceof JsonObject answer
                    && Json.truthy(answer.get("error"))) {
                throw new FunctionException(Json.str(answer.get("error")));
            }
            throw new TransportException("the server closed the session");
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new TransportException("interrupted while sending to the server");
        }
    }

    private JsonObject receiveFrame() {
        Frames.Event event;
        try {
            event = frames.events.poll(options.timeout().toMillis(), TimeUnit.MILLISECONDS);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new TransportException("interrupted while waiting for the server");
        }
        if (event == null) {
            throw new TransportException("the server did not answer within " + options.timeout().toSeconds() + " s");
        }
        if (event instanceof Frames.Closed c) {
            frames.events.add(c); // every later receive sees the close too
            throw closeError(c.code(), c.reason());
        }
        if (event instanceof Frames.Failed f) {
            frames.events.add(f);
            String why = f.error().getMessage();
            throw new TransportException("the server closed the session: "
                    + (why == null ? f.error().getClass().getSimpleName() : why));
        }
        if (event instanceof Frames.Binary) {
            throw new FormatException("expected a text frame from the server");
        }
        JsonElement parsed = Json.parse(((Frames.Text) event).text());
        if (parsed == null) {
            throw new FormatException("the server sent a frame that is not JSON");
        }
        if (!parsed.isJsonObject()) {
            throw new FormatException("the server sent a frame that is not a JSON object");
        }
        return parsed.getAsJsonObject();
    }

    private static JsonObject messageOf(JsonObject parsed) {
        if (Json.truthy(parsed.get("error"))) {
            throw new FunctionException(Json.str(parsed.get("error")));
        }
        JsonElement message = parsed.get("message");
        if (message == null || !message.isJsonObject()) {
            throw new FormatException("expected {\"message\": {...}} from the server");
        }
        return message.getAsJsonObject();
    }

    private static TransportException closeError(int code, String reason) {
        if (code == 1000 && "idle timeout".equals(reason)) {
            return new TransportException("the session was closed after being idle; connect again", 1000);
        }
        if (reason != null && !reason.isEmpty()) {
            return new TransportException("the server closed the session: " + reason, code);
        }
        return new TransportException("the server closed the session", code);
    }

    /** Wait for the server to end the session (after a deploy or key session), then close. */
    void waitClosed() {
        try {
            long deadline = System.nanoTime() + CLOSE_TIMEOUT.toNanos();
            while (System.nanoTime() < deadline) {
                Frames.Event event = frames.events.poll(
                        Math.max(1, (deadline - System.nanoTime()) / 1_000_000), TimeUnit.MILLISECONDS);
                if (event instanceof Frames.Closed || event instanceof Frames.Failed || event == null) {
                    break;
                }
            }
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
        close();
    }

    /** Close with 1000 and wait briefly for the server's close (then drop the connection). */
    @Override
    public void close() {
        if (closed) {
            return;
        }
        closed = true;
        try {
            if (!ws.isOutputClosed()) {
                ws.sendClose(WebSocket.NORMAL_CLOSURE, "").get(CLOSE_TIMEOUT.toMillis(), TimeUnit.MILLISECONDS);
            }
            long deadline = System.nanoTime() + CLOSE_TIMEOUT.toNanos();
            while (!ws.isInputClosed() && System.nanoTime() < deadline) {
                Frames.Event event = frames.events.poll(50, TimeUnit.MILLISECONDS);
                if (event instanceof Frames.Closed || event instanceof Frames.Failed) {
                    break;
                }
            }
        } catch (ExecutionException | TimeoutException e) {
            // the connection is gone already; abort below
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        } finally {
            ws.abort();
        }
    }

    /** The websocket listener: whole frames into a queue, one at a time. */
    static final class Frames implements WebSocket.Listener {
        sealed interface Event permits Text, Binary, Closed, Failed {}

        record Text(String text) implements Event {}

        record Binary(byte[] data) implements Event {}

        record Closed(int code, String reason) implements Event {}

        record Failed(Throwable error) implements Event {}

        final BlockingQueue<Event> events = new LinkedBlockingQueue<>();
        private StringBuilder text = new StringBuilder();
        private ByteArrayOutputStream binary = new ByteArrayOutputStream();

        @Override
        public void onOpen(WebSocket webSocket) {
            webSocket.request(1);
        }

        @Override
        public CompletionStage<?> onText(WebSocket webSocket, CharSequence data, boolean last) {
            text.append(data);
            if (text.length() > MAX_FRAME_BYTES) {
                events.add(new Failed(new IllegalStateException("a frame exceeds the client's limit")));
                webSocket.abort();
                return null;
            }
            if (last) {
                events.add(new Text(text.toString()));
                text = new StringBuilder();
            }
            webSocket.request(1);
            return null;
        }

        @Override
        public CompletionStage<?> onBinary(WebSocket webSocket, ByteBuffer data, boolean last) {
            byte[] chunk = new byte[data.remaining()];
            data.get(chunk);
            binary.writeBytes(chunk);
            if (binary.size() > MAX_FRAME_BYTES) {
                events.add(new Failed(new IllegalStateException("a frame exceeds the client's limit")));
                webSocket.abort();
                return null;
            }
            if (last) {
                events.add(new Binary(binary.toByteArray()));
                binary = new ByteArrayOutputStream();
            }
            webSocket.request(1);
            return null;
        }

        @Override
        public CompletionStage<?> onClose(WebSocket webSocket, int statusCode, String reason) {
            events.add(new Closed(statusCode, reason));
            return null;
        }

        @Override
        public void onError(WebSocket webSocket, Throwable error) {
            events.add(new Failed(error));
        }
    }
}

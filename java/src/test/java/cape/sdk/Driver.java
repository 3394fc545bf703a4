package cape.sdk;

import cape.crypto.Envelope;
import cape.errors.CapeException;
import cape.errors.FunctionException;
import cape.errors.PcrMismatchException;
import cape.errors.RequestRefusedException;
import cape.errors.TransportException;
import com.google.gson.Gson;
import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Path;
import java.time.Duration;
import java.time.Instant;
import java.util.ArrayList;
import java.util.Base64;
import java.util.HexFormat;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * Drives the Java client for {@code tests/integration/test_java_hostile.py}: one JSON command per
 * stdin line, one JSON outcome per stdout line, so one JVM replays every hostile-server case.
 *
 * <p>Command: {@code {"url", "ca", "root", "flow": run|record|test|deploy|key, "inputs": [b64],
 * "pipelined", "seal", "checksum", "pcrs": {"0": [hex]}, "clock_shift_s", "owner", "key_der",
 * "bundle", "timeout_ms"}}. Outcome: {@code {"value": …}} or {@code {"error": {"type", "message",
 * "status", "close_code"}}}, plus {@code "got"}: what a recording client accepted before it
 * refused (outputs as {@code {"ok": b64}}, failed calls as {@code {"function_error": text}}).
 */
public final class Driver {
    private static final Gson GSON = new Gson();

    private Driver() {}

    public static void main(String[] args) throws Exception {
        PrintStream out = new PrintStream(System.out, true, StandardCharsets.UTF_8);
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        String line;
        while ((line = in.readLine()) != null) {
            if (line.isBlank()) {
                continue;
            }
            out.println(GSON.toJson(handle(GSON.fromJson(line, JsonObject.class))));
        }
    }

    private static byte[] b64(JsonElement value) {
        return Base64.getDecoder().decode(value.getAsString());
    }

    private static String b64(byte[] data) {
        return Base64.getEncoder().encodeToString(data);
    }

    static Map<String, Object> handle(JsonObject command) {
        Map<String, Object> outcome = new LinkedHashMap<>();
        List<Object> got = new ArrayList<>();
        outcome.put("got", got);
        try {
            outcome.put("value", run(command, got));
        } catch (CapeException e) {
            Map<String, Object> error = new LinkedHashMap<>();
            error.put("type", e.getClass().getSimpleName());
            error.put("message", e.getMessage());
            if (e instanceof RequestRefusedException r) {
                error.put("status", r.status());
            }
            if (e instanceof TransportException t) {
                error.put("close_code", t.closeCode());
            }
            if (e instanceof PcrMismatchException p) {
                error.put("index", p.index());
            }
            outcome.put("error", error);
        } catch (RuntimeException e) { // a bug in the client: the Python side fails the test
            Map<String, Object> error = new LinkedHashMap<>();
            error.put("type", e.getClass().getName());
            error.put("message", String.valueOf(e.getMessage()));
            error.put("bug", true);
            outcome.put("error", error);
        }
        return outcome;
    }

    private static Cape client(JsonObject c) {
        Cape.Builder builder = Cape.builder()
                .url(c.get("url").getAsString())
                .token(c.has("token") ? c.get("token").getAsString() : "test-token")
                .caFile(Path.of(c.get("ca").getAsString()))
                .root(Path.of(c.get("root").getAsString()))
                .sealResults(!c.has("seal") || c.get("seal").getAsBoolean())
                .timeout(Duration.ofMillis(c.has("timeout_ms") ? c.get("timeout_ms").getAsLong() : 20_000));
        if (c.has("owner")) {
            builder.username(c.get("owner").getAsString());
        }
        if (c.has("clock_shift_s")) {
            long shift = c.get("clock_shift_s").getAsLong();
            builder.clock(() -> Instant.now().plusSeconds(shift));
        }
        if (c.has("pcrs")) {
            for (Map.Entry<String, JsonElement> pin : c.getAsJsonObject("pcrs").entrySet()) {
                for (JsonElement value : pin.getValue().getAsJsonArray()) {
                    builder.pcr(Integer.parseInt(pin.getKey()), value.getAsString());
                }
            }
        }
        return builder.build();
    }

    private static List<byte[]> inputs(JsonObject c) {
        List<byte[]> inputs = new ArrayList<>();
        if (c.has("inputs")) {
            for (JsonElement input : c.getAsJsonArray("inputs")) {
                inputs.add(b64(input));
            }
        } else {
            inputs.add("hello".getBytes(StandardCharsets.US_ASCII));
        }
        return inputs;
    }

    private static Object run(JsonObject c, List<Object> got) {
        String checksum = c.has("checksum") && !c.get("checksum").isJsonNull() ? c.get("checksum").getAsString() : null;
        String function = c.has("function") ? c.get("function").getAsString() : "alice/echo";
        try (Cape cape = client(c)) {
            switch (c.get("flow").getAsString()) {
                case "run": {
                    List<String> outputs = new ArrayList<>();
                    try (FunctionSession session = cape.connect(function, checksum)) {
                        for (byte[] input : inputs(c)) {
                            outputs.add(b64(session.invoke(input)));
                        }
                    }
                    return outputs;
                }
                case "record": {
                    Options options = new Options(cape.url(), httpOf(cape), c.has("token") ? c.get("token").getAsString() : "test-token",
                            cape.root(), pinsOf(c), checksum,
                            !c.has("seal") || c.get("seal").getAsBoolean(), Instant::now,
                            Duration.ofMillis(c.has("timeout_ms") ? c.get("timeout_ms").getAsLong() : 20_000));
                    boolean pipelined = c.has("pipelined") && c.get("pipelined").getAsBoolean();
                    List<byte[]> inputs = inputs(c);
                    try (Session session = Session.open(Cape.runPath(function), options)) {
                        if (pipelined) {
                            for (byte[] input : inputs) {
                                session.sendSealed(input);
                            }
                        }
                        for (byte[] input : inputs) {
                            if (!pipelined) {
                                session.sendSealed(input);
                            }
                            try {
                                got.add(Map.of("ok", b64(session.receiveResult())));
                            } catch (FunctionException e) {
                                got.add(Map.of("function_error", e.getMessage()));
                            }
                        }
                    }
                    return got;
                }
                case "test":
                    return List.of(b64(cape.test(b64(c.get("bundle")), "in".getBytes(StandardCharsets.US_ASCII))));
                case "deploy": {
                    Deployed deployed = cape.deploy(b64(c.get("bundle")), "echo", false,
                            Envelope.loadPublicKey(b64(c.get("key_der"))));
                    return Map.of("id", deployed.id(), "checksum", deployed.checksum(), "name", deployed.name());
                }
                case "key":
                    return b64(cape.ownKey().getEncoded());
                case "user_key":
                    return b64(cape.key(c.get("username").getAsString()).getEncoded());
                default:
                    throw new IllegalArgumentException("unknown flow " + c.get("flow"));
            }
        }
    }

    private static java.net.http.HttpClient httpOf(Cape cape) {
        return cape.http();
    }

    private static Map<Integer, java.util.Set<java.nio.ByteBuffer>> pinsOf(JsonObject c) {
        Map<Integer, java.util.Set<java.nio.ByteBuffer>> pins = new java.util.TreeMap<>();
        if (c.has("pcrs")) {
            for (Map.Entry<String, JsonElement> pin : c.getAsJsonObject("pcrs").entrySet()) {
                JsonArray values = pin.getValue().getAsJsonArray();
                for (JsonElement value : values) {
                    pins.computeIfAbsent(Integer.parseInt(pin.getKey()), i -> new java.util.HashSet<>())
                            .add(java.nio.ByteBuffer.wrap(HexFormat.of().parseHex(value.getAsString())));
                }
            }
        }
        return pins;
    }
}

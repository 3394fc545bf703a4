package cape.sdk;

import java.net.http.HttpClient;
import java.nio.ByteBuffer;
import java.security.cert.X509Certificate;
import java.time.Duration;
import java.time.Instant;
import java.util.Map;
import java.util.Set;
import java.util.function.Supplier;

/** How one session connects and verifies (mirrors {@code cape.sdk.session.SessionOptions}). */
record Options(
        String url,
        HttpClient http,
        String token,
        X509Certificate root,
        Map<Integer, Set<ByteBuffer>> pcrs,
        String checksum,
        boolean sealResults,
        Supplier<Instant> clock,
        Duration timeout) {}

package cape.verify;

import java.nio.ByteBuffer;
import java.time.Duration;
import java.util.Collections;
import java.util.HashSet;
import java.util.Map;
import java.util.Set;
import java.util.TreeMap;

/**
 * What a verifier requires beyond a valid signature and chain (mirrors
 * {@code cape.verify.policy.AttestationPolicy}).
 *
 * @param nonce when set, the document must carry exactly these bytes
 * @param pcrs allow-lists: each listed PCR must be present and hold one of its values
 * @param maxAge the oldest acceptable timestamp relative to the check time ({@code null}: no limit)
 * @param clockSkew how far a timestamp may lie in the check time's future
 * @param allowDebug accept debug-mode enclaves (PCR0 zero); never for production
 */
public record Policy(
        byte[] nonce,
        Map<Integer, Set<ByteBuffer>> pcrs,
        Duration maxAge,
        Duration clockSkew,
        boolean allowDebug) {
    public static final Duration DEFAULT_MAX_AGE = Duration.ofMinutes(5);
    public static final Duration DEFAULT_CLOCK_SKEW = Duration.ofSeconds(60);

    public Policy {
        nonce = nonce == null ? null : nonce.clone();
        Map<Integer, Set<ByteBuffer>> copy = new TreeMap<>();
        for (Map.Entry<Integer, Set<ByteBuffer>> e : (pcrs == null ? Map.<Integer, Set<ByteBuffer>>of() : pcrs).entrySet()) {
            if (e.getKey() < 0 || e.getKey() >= 32) {
                throw new IllegalArgumentException("PCR index " + e.getKey() + " is outside 0..31");
            }
            if (e.getValue().isEmpty()) {
                throw new IllegalArgumentException("PCR" + e.getKey() + " allow-list is empty");
            }
            copy.put(e.getKey(), Collections.unmodifiableSet(new HashSet<>(e.getValue())));
        }
        pcrs = Collections.unmodifiableMap(copy);
        if (maxAge != null && maxAge.isNegative()) {
            throw new IllegalArgumentException("maxAge must not be negative");
        }
        clockSkew = clockSkew == null ? DEFAULT_CLOCK_SKEW : clockSkew;
    }

    /** A live session's policy: this nonce and these pins, default age and skew, no debug. */
    public static Policy live(byte[] nonce, Map<Integer, Set<ByteBuffer>> pcrs) {
        return new Policy(nonce, pcrs, DEFAULT_MAX_AGE, DEFAULT_CLOCK_SKEW, false);
    }

    @Override
    public byte[] nonce() {
        return nonce == null ? null : nonce.clone();
    }
}

package cape.sdk;

import cape.errors.CapeException;
import cape.verify.AttestationDocument;
import java.util.HexFormat;

/**
 * A verified session with one function's enclave: {@link #invoke} as often as needed, then
 * {@link #close}. Module-level state of the function lives as long as the session.
 *
 * <p>Not thread-safe: one call at a time (each input gets its reply before the next is sent).
 */
public final class FunctionSession implements AutoCloseable {
    private final Session session;
    private final Runnable onClose;

    FunctionSession(Session session, Runnable onClose) {
        this.session = session;
        this.onClose = onClose;
    }

    /** Send one input, sealed to the attested enclave key; the function's (unsealed) output. */
    public synchronized byte[] invoke(byte[] input) {
        return session.invoke(input.clone());
    }

    /** The verified attestation document of this session. */
    public AttestationDocument attestation() {
        return session.document();
    }

    /** The function checksum (hex) the enclave attested, or {@code null}. */
    public String functionChecksum() {
        String encoded = Json.string(session.userData().get("func_checksum"));
        if (encoded == null) {
            return null;
        }
        try {
            return HexFormat.of().formatHex(Json.b64(encoded, "function checksum"));
        } catch (CapeException e) {
            return null;
        }
    }

    @Override
    public synchronized void close() {
        try {
            session.close();
        } finally {
            onClose.run();
        }
    }
}

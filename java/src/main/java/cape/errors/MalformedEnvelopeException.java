package cape.errors;

/**
 * A ciphertext that is structurally wrong (too short) before any crypto runs.
 *
 * <p>In Python this is both a DecryptionError and a FormatError; Java has single inheritance,
 * so it is a {@link DecryptionException}.
 */
public class MalformedEnvelopeException extends DecryptionException {
    private static final long serialVersionUID = 1L;

    public MalformedEnvelopeException(String message) {
        super(message);
    }
}

package cape.errors;

/**
 * A ciphertext (a sealed result or error) could not be opened; cryptographic failures share one
 * message, so the error is not an oracle.
 */
public class DecryptionException extends CapeException {
    private static final long serialVersionUID = 1L;

    public DecryptionException(String message) {
        super(message);
    }
}

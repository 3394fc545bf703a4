package cape.errors;

/**
 * The document does not carry the nonce this client sent.
 */
public class NonceMismatchException extends VerificationException {
    private static final long serialVersionUID = 1L;

    public NonceMismatchException(String message) {
        super(message);
    }
}

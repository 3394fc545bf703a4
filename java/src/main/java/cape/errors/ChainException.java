package cape.errors;

/**
 * The certificate chain does not lead to the pinned root at the check time.
 */
public class ChainException extends VerificationException {
    private static final long serialVersionUID = 1L;

    public ChainException(String message) {
        super(message);
    }
}

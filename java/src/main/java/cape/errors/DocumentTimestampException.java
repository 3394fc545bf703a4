package cape.errors;

/**
 * The document's timestamp lies after the check time (beyond the clock skew).
 */
public class DocumentTimestampException extends VerificationException {
    private static final long serialVersionUID = 1L;

    public DocumentTimestampException(String message) {
        super(message);
    }
}

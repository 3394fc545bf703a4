package cape.errors;

/**
 * An attestation document, signature, binding or checksum failed a check.
 */
public class VerificationException extends CapeException {
    private static final long serialVersionUID = 1L;

    public VerificationException(String message) {
        super(message);
    }
}

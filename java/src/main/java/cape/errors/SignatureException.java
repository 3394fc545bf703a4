package cape.errors;

/**
 * The COSE signature does not verify with the document's certificate.
 */
public class SignatureException extends VerificationException {
    private static final long serialVersionUID = 1L;

    public SignatureException(String message) {
        super(message);
    }
}

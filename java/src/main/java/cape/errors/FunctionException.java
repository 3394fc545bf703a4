package cape.errors;

/**
 * The function raised (or the server reported a call failure); the session stays open.
 */
public class FunctionException extends CapeException {
    private static final long serialVersionUID = 1L;

    public FunctionException(String message) {
        super(message);
    }
}

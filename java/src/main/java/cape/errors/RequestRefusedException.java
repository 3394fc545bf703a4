package cape.errors;

/** The server answered a request or a session upgrade with an error {@link #status()}. */
public class RequestRefusedException extends CapeException {
    private static final long serialVersionUID = 1L;

    private final int status;

    public RequestRefusedException(String message, int status) {
        super(message);
        this.status = status;
    }

    public int status() {
        return status;
    }
}

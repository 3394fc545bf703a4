package cape.sdk;

import cape.crypto.Envelope;
import cape.errors.CapeException;
import cape.errors.FormatException;
import cape.errors.UntrustedRootException;
import cape.errors.VerificationException;
import cape.verify.AttestationDocument;
import cape.verify.Roots;
import cape.verify.Verifier;
import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import java.io.ByteArrayInputStream;
import java.io.IOException;
import java.net.http.HttpClient;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.GeneralSecurityException;
import java.security.KeyStore;
import java.security.MessageDigest;
import java.security.cert.Certificate;
import java.security.cert.CertificateFactory;
import java.security.cert.X509Certificate;
import java.security.interfaces.RSAPublicKey;
import java.time.Duration;
import java.time.Instant;
import java.util.ArrayList;
import java.util.Collections;
import java.util.HashSet;
import java.util.HexFormat;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Set;
import java.util.TreeMap;
import java.util.concurrent.ConcurrentHashMap;
import java.util.function.Supplier;
import java.util.regex.Pattern;
import javax.net.ssl.SSLContext;
import javax.net.ssl.TrustManagerFactory;

/**
 * A client of one Cape server: the Java face of the Python SDK ({@code cape.sdk.client}).
 *
 * <pre>{@code
 * try (Cape cape = Cape.builder().url(url).token(token).caFile(ca).root(rootPem).build()) {
 *     byte[] secret = cape.encrypt(data, "alice");
 *     byte[] out = cape.run("alice/echo", secret);
 * }
 * }</pre>
 *
 * <p>Every session verifies before anything secret leaves the process: the attestation document
 * must chain to the pinned root and carry this session's nonce, the pinned PCRs and checksum, and
 * results are sealed to a response key bound into the document. Keys fetched by user name must
 * come in a document that names that user. Every failure is a {@link CapeException}.
 */
public final class Cape implements AutoCloseable {
    static final Pattern ID = Pattern.compile("[A-Za-z0-9]{22}");
    static final Pattern USERNAME = Pattern.compile("[a-z0-9][a-z0-9_-]{0,38}");
    static final Pattern FUNCTION_NAME = Pattern.compile("[A-Za-z0-9][A-Za-z0-9._-]{0,63}");
    static final Pattern CHECKSUM = Pattern.compile("[0-9a-fA-F]{64}");
    static final int DEPLOY_CHUNK_BYTES = 1 << 20;

    private final String url;
    private final String token;
    private final String username;
    private final HttpClient http;
    private final Map<Integer, Set<ByteBuffer>> pcrs;
    private final boolean sealResults;
    private final Supplier<Instant> clock;
    private final Duration timeout;
    private final String rootFingerprint;
    private volatile X509Certificate root;
    private final Map<String, RSAPublicKey> keys = new ConcurrentHashMap<>();
    private final Set<FunctionSession> open = ConcurrentHashMap.newKeySet();

    private Cape(Builder b) {
        if (b.url == null) {
            throw new FormatException("a server URL is required (Cape.builder().url(...))");
        }
        this.url = b.url.replaceAll("/+$", "");
        this.token = b.token;
        this.username = b.username == null ? null : checkUsername(b.username);
        this.pcrs = Collections.unmodifiableMap(new TreeMap<>(b.pcrs));
        this.sealResults = b.sealResults;
        this.clock = b.clock;
        this.timeout = b.timeout;
        this.root = b.root;
        this.rootFingerprint = b.rootFingerprint;
        HttpClient.Builder http = HttpClient.newBuilder()
                .connectTimeout(Session.OPEN_TIMEOUT)
                .version(HttpClient.Version.HTTP_1_1);
        if (b.sslContext != null) {
            http.sslContext(b.sslContext);
        }
        this.http = http.build();
    }

    public static Builder builder() {
        return new Builder();
    }

    /** The server URL this client talks to. */
    public String url() {
        return url;
    }

    // -- trust --------------------------------------------------------------------------------

    /**
     * The pinned attestation root. With a fingerprint pin, the server's root is fetched once and
     * must have exactly that SHA-256 fingerprint ({@link UntrustedRootException} otherwise).
     */
    public X509Certificate root() {
        X509Certificate pinned = root;
        if (pinned != null) {
            return pinned;
        }
        if (rootFingerprint == null) {
            throw new UntrustedRootException("no attestation root is pinned for " + url
                    + ": pass Cape.builder().root(PEM or SHA-256 fingerprint)");
        }
        synchronized (this) {
            if (root == null) {
                Object answer = restClient().request("GET", "/v1/attestation/root", null, null);
                byte[] pem = answer instanceof byte[] b ? b : answer.toString().getBytes(StandardCharsets.UTF_8);
                X509Certificate offered = Roots.load(pem);
                String got = Roots.fingerprint(offered);
                if (!MessageDigest.isEqual(got.getBytes(StandardCharsets.US_ASCII),
                        rootFingerprint.getBytes(StandardCharsets.US_ASCII))) {
                    throw new UntrustedRootException("the server's attestation root has fingerprint "
                            + got + ", not " + rootFingerprint + "; not pinned");
                }
                root = offered;
            }
            return root;
        }
    }

    HttpClient http() {
        return http;
    }

    private Rest restClient() {
        return new Rest(url, http);
    }

    private Options options(String checksum) {
        if (token == null) {
            throw new FormatException("this call needs a token (Cape.builder().token(...))");
        }
        return new Options(url, http, token, root(), pcrs, checksum, sealResults, clock, timeout);
    }

    // -- accounts -----------------------------------------------------------------------------

    /** Create an account; returns its login token (build a new client with it). */
    public String signup(String username, String password) {
        return account("/v1/signup", username, password);
    }

    /** Log in; returns a token valid for 12 hours. */
    public String login(String username, String password) {
        return account("/v1/login", username, password);
    }

    private String account(String path, String username, String password) {
        Object answer = restClient().request(
                "POST", path, Map.of("username", username, "password", password), null);
        String issued = answer instanceof JsonObject o ? Json.string(o.get("access_token")) : null;
        if (issued == null) {
            throw new FormatException("the server's login answer carries no token");
        }
        return issued;
    }

    // -- keys and encryption ------------------------------------------------------------------

    /**
     * {@code username}'s Cape key, from the document the server recorded when the key was made:
     * verified at its own timestamp against the pinned root and PCR pins, and it must name
     * {@code username} as its owner.
     */
    public RSAPublicKey key(String username) {
        String canonical = checkUsername(username);
        RSAPublicKey cached = keys.get(canonical);
        if (cached != null) {
            return cached;
        }
        X509Certificate pinned = root(); // before any network call: no pinned root, no request
        Object answer = restClient().request("GET", "/v1/user/" + canonical + "/key", null, null);
        String encoded = answer instanceof JsonObject o ? Json.string(o.get("attestation_document")) : null;
        if (encoded == null) {
            throw new FormatException("the server's key answer carries no attestation document");
        }
        byte[] raw = Json.b64(encoded, "key document");
        AttestationDocument document = Verifier.verifyArchived(raw, pinned, pcrs);
        byte[] userBytes = document.userData();
        JsonElement parsed = Json.parse(userBytes == null || userBytes.length == 0
                ? "{}" : new String(userBytes, StandardCharsets.UTF_8));
        if (parsed == null) {
            throw new FormatException("the key document's user_data is not JSON");
        }
        if (!parsed.isJsonObject()) {
            throw new FormatException("the key document's user_data is not a JSON object");
        }
        JsonObject userData = parsed.getAsJsonObject();
        RSAPublicKey key = keyFromUserData(userData, canonical);
        keys.put(canonical, key);
        return key;
    }

    /**
     * This token's own Cape key, from an attested key session (created on first use). With
     * {@link Builder#username}, the document must name that account.
     */
    public RSAPublicKey ownKey() {
        Session session = Session.open("/v1/key", options(null));
        try {
            return keyFromUserData(session.userData(), username);
        } finally {
            session.waitClosed();
        }
    }

    static RSAPublicKey keyFromUserData(JsonObject userData, String owner) {
        String encoded = Json.string(userData.get("key"));
        if (encoded == null) {
            throw new FormatException("the key document carries no key");
        }
        if (owner != null && !owner.equals(Json.string(userData.get("owner")))) {
            throw new VerificationException("the key document is for " + Json.repr(userData.get("owner"))
                    + ", not '" + owner + "'; refusing it");
        }
        byte[] der;
        try {
            der = Json.b64(encoded, "key");
        } catch (FormatException e) {
            throw new FormatException("the key in the key document is not valid base64");
        }
        return Envelope.loadPublicKey(der);
    }

    /** {@code cape:} + base64 envelope of {@code input} for {@code username}'s verified key. */
    public byte[] encrypt(byte[] input, String username) {
        return Envelope.encryptText(input, key(username));
    }

    /** {@code cape:} + base64 envelope of {@code input} for a key you already hold. */
    public static byte[] encrypt(byte[] input, RSAPublicKey key) {
        return Envelope.encryptText(input, key);
    }

    // -- functions ----------------------------------------------------------------------------

    /** The run route of a function id or {@code user/name}. */
    static String runPath(String function) {
        if (function == null) {
            throw new FormatException("a function is an id or 'user/name'");
        }
        int slash = function.indexOf('/');
        if (slash >= 0) {
            String user = function.substring(0, slash);
            String name = function.substring(slash + 1);
            if (!USERNAME.matcher(user.toLowerCase(Locale.ROOT)).matches()
                    || !FUNCTION_NAME.matcher(name).matches()) {
                throw new FormatException("a function name looks like 'user/name', not '" + function + "'");
            }
            return "/v1/run/" + user.toLowerCase(Locale.ROOT) + "/" + name;
        }
        if (ID.matcher(function).matches()) {
            return "/v1/run/" + function;
        }
        throw new FormatException("'" + function + "' is neither a function id (22 characters) nor 'user/name'");
    }

    /** Open a verified session with a function's enclave (by id or {@code user/name}). */
    public FunctionSession connect(String function) {
        return connect(function, null);
    }

    /** As {@link #connect(String)}, also requiring the enclave to attest this checksum (hex). */
    public FunctionSession connect(String function, String checksum) {
        if (checksum != null && !CHECKSUM.matcher(checksum).matches()) {
            throw new FormatException("a function checksum is 64 hex digits (SHA-256)");
        }
        Session session = Session.open(runPath(function), options(checksum));
        FunctionSession[] holder = new FunctionSession[1];
        holder[0] = new FunctionSession(session, () -> open.remove(holder[0]));
        open.add(holder[0]);
        return holder[0];
    }

    /** connect + invoke + close. */
    public byte[] run(String function, byte[] input) {
        try (FunctionSession session = connect(function)) {
            return session.invoke(input);
        }
    }

    /** Deploy a zip (with {@code app.py} defining {@code cape_handler}) under {@code name}. */
    public Deployed deploy(byte[] zip, String name, boolean isPublic) {
        if (name == null || !FUNCTION_NAME.matcher(name).matches()) {
            throw new FormatException("invalid function name '" + name + "': use 1-64 characters of "
                    + "A-Z, a-z, 0-9, '.', '_' and '-', starting with a letter or digit");
        }
        return deploy(zip, name, isPublic, ownKey());
    }

    /** Deploy encrypted to {@code key} (the caller's own attested key). */
    Deployed deploy(byte[] zip, String name, boolean isPublic, RSAPublicKey key) {
        String checksum = HexFormat.of().formatHex(Session.sha256(zip));
        byte[] ciphertext = Envelope.encrypt(zip, key);
        Session session = Session.open("/v1/deploy", options(null));
        JsonObject reply;
        try {
            Map<String, Object> info = new LinkedHashMap<>();
            info.put("function_name", name);
            info.put("public", isPublic);
            info.put("bundle_size", ciphertext.length);
            session.sendJson(info);
            for (int start = 0; start < ciphertext.length; start += DEPLOY_CHUNK_BYTES) {
                int end = Math.min(ciphertext.length, start + DEPLOY_CHUNK_BYTES);
                session.sendBytes(java.util.Arrays.copyOfRange(ciphertext, start, end));
            }
            reply = session.receive();
        } finally {
            session.waitClosed();
        }
        JsonElement reported = reply.get("checksum");
        if (!checksum.equals(Json.string(reported))) {
            throw new FormatException("the enclave reports checksum "
                    + (Json.string(reported) != null ? Json.string(reported) : Json.repr(reported))
                    + ", but the bundle's is " + checksum);
        }
        String id = Json.string(reply.get("id"));
        if (id == null) {
            throw new FormatException("the deploy reply carries no function id");
        }
        String shown = reply.has("name") ? Json.str(reply.get("name")) : name;
        return new Deployed(id, checksum, shown);
    }

    /** Run a zip once on {@code input} without storing it. */
    public byte[] test(byte[] zip, byte[] input) {
        try (Session session = Session.open("/v1/test", options(null))) {
            session.sendSealed(zip);
            return session.invoke(input);
        }
    }

    // -- management (REST) --------------------------------------------------------------------

    private Object call(String method, String path, Map<String, ?> body) {
        if (token == null) {
            throw new FormatException("this call needs a token (Cape.builder().token(...))");
        }
        return restClient().request(method, path, body, token);
    }

    private static String checkId(String id, String what) {
        if (id == null || !ID.matcher(id).matches()) {
            throw new FormatException(what + " is a 22-character id, not '" + id + "'");
        }
        return id;
    }

    /** One's deployed functions, newest first. */
    public List<FunctionInfo> functions() {
        return functions(50, 0);
    }

    public List<FunctionInfo> functions(int limit, int offset) {
        Object rows = call("GET", "/v1/functions?limit=" + limit + "&offset=" + offset, null);
        if (!(rows instanceof JsonArray array)) {
            throw new FormatException("the server's function list is not a list");
        }
        List<FunctionInfo> out = new ArrayList<>();
        for (JsonElement row : array) {
            JsonObject r = object(row, "function list");
            out.add(new FunctionInfo(required(r, "id", "function list"), required(r, "name", "function list"),
                    required(r, "created_at", "function list"), Json.string(r.get("checksum")),
                    r.has("public") && Json.truthy(r.get("public"))));
        }
        return out;
    }

    /** Delete one of your functions by id (its stored bundle goes with it). */
    public void deleteFunction(String id) {
        call("DELETE", "/v1/functions/" + checkId(id, "a function"), null);
    }

    /** A personal access token, optionally scoped to one function and expiring. */
    public CreatedToken createToken(String name, String description, String functionId, Duration expiry) {
        Map<String, Object> body = new LinkedHashMap<>();
        body.put("name", name);
        body.put("description", description == null ? "" : description);
        if (functionId != null) {
            body.put("function_id", checkId(functionId, "a function"));
        }
        if (expiry != null) {
            if (expiry.toSeconds() <= 0) {
                throw new FormatException("a token expiry must be positive");
            }
            body.put("expiry", expiry.toSeconds());
        }
        Object answer = call("POST", "/v1/token", body);
        String created = answer instanceof JsonObject o ? Json.string(o.get("token")) : null;
        if (created == null) {
            throw new FormatException("the server's token answer is malformed");
        }
        return new CreatedToken(Json.str(((JsonObject) answer).get("id")), created);
    }

    /** Your tokens' metadata (never the tokens themselves). */
    public List<TokenInfo> tokens() {
        Object rows = call("GET", "/v1/tokens", null);
        if (!(rows instanceof JsonArray array)) {
            throw new FormatException("the server's token list is not a list");
        }
        List<TokenInfo> out = new ArrayList<>();
        for (JsonElement row : array) {
            JsonObject r = object(row, "token list");
            out.add(new TokenInfo(required(r, "id", "token list"), required(r, "name", "token list"),
                    r.has("description") && Json.truthy(r.get("description")) ? Json.str(r.get("description")) : "",
                    required(r, "created_at", "token list"), Json.string(r.get("expiry")),
                    Json.string(r.get("last_used")), Json.string(r.get("function_id"))));
        }
        return out;
    }

    /** Delete a token by id; it stops working at once. */
    public void deleteToken(String id) {
        call("DELETE", "/v1/token/" + checkId(id, "a token"), null);
    }

    private static JsonObject object(JsonElement row, String what) {
        if (!row.isJsonObject()) {
            throw new FormatException("the server's " + what + " is malformed");
        }
        return row.getAsJsonObject();
    }

    private static String required(JsonObject row, String field, String what) {
        JsonElement value = row.get(field);
        if (value == null || value.isJsonNull()) {
            throw new FormatException("the server's " + what + " is malformed");
        }
        return Json.str(value);
    }

    static String checkUsername(String username) {
        String canonical = username == null ? "" : username.toLowerCase(Locale.ROOT);
        if (!USERNAME.matcher(canonical).matches()) {
            throw new FormatException("invalid username '" + username + "': use 1-39 characters of "
                    + "a-z, 0-9, '_' and '-', starting with a letter or digit");
        }
        return canonical;
    }

    /** Close every function session still open. */
    @Override
    public void close() {
        for (FunctionSession session : List.copyOf(open)) {
            session.close();
        }
    }

    /** Settings for a {@link Cape} client. */
    public static final class Builder {
        private String url;
        private String token;
        private String username;
        private SSLContext sslContext;
        private X509Certificate root;
        private String rootFingerprint;
        private final Map<Integer, Set<ByteBuffer>> pcrs = new TreeMap<>();
        private boolean sealResults = true;
        private Supplier<Instant> clock = Instant::now;
        private Duration timeout = Duration.ofMinutes(5);

        private Builder() {}

        /** The server, {@code https://host:port} (plain http is refused). */
        public Builder url(String url) {
            this.url = url;
            return this;
        }

        /** A login token or personal access token. */
        public Builder token(String token) {
            if (token == null || token.isBlank()) {
                throw new FormatException("the token is empty");
            }
            this.token = token.strip();
            return this;
        }

        /** The account the token belongs to: its own key document must then name it. */
        public Builder username(String username) {
            this.username = username;
            return this;
        }

        /** Trust the server's TLS certificate through this CA (PEM file), e.g. cape serve's ca.pem. */
        public Builder caFile(Path pem) {
            try {
                return caPem(Files.readAllBytes(pem));
            } catch (IOException e) {
                throw new FormatException("cannot read the CA file " + pem + ": " + e.getMessage());
            }
        }

        /** Trust the server's TLS certificate through these CA certificates (PEM). */
        public Builder caPem(byte[] pem) {
            try {
                KeyStore store = KeyStore.getInstance(KeyStore.getDefaultType());
                store.load(null, null);
                int i = 0;
                for (Certificate cert : CertificateFactory.getInstance("X.509")
                        .generateCertificates(new ByteArrayInputStream(pem))) {
                    store.setCertificateEntry("ca" + i++, cert);
                }
                if (i == 0) {
                    throw new FormatException("the CA file holds no certificate");
                }
                TrustManagerFactory trust = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
                trust.init(store);
                SSLContext context = SSLContext.getInstance("TLS");
                context.init(null, trust.getTrustManagers(), null);
                return sslContext(context);
            } catch (GeneralSecurityException | IOException e) {
                throw new FormatException("the CA file is not a PEM certificate: " + e.getMessage());
            }
        }

        /** A TLS context of your own (default: the JDK's trust store). */
        public Builder sslContext(SSLContext context) {
            this.sslContext = context;
            return this;
        }

        /**
         * Pin the attestation root: a PEM certificate, or the SHA-256 fingerprint (64 hex digits,
         * colons allowed) that the operator gives you, which the server's root must match.
         */
        public Builder root(String pemOrFingerprint) {
            if (pemOrFingerprint.contains("-----BEGIN")) {
                return root(Roots.load(pemOrFingerprint.getBytes(StandardCharsets.US_ASCII)));
            }
            String hex = pemOrFingerprint.replace(":", "").strip().toLowerCase(Locale.ROOT);
            if (!CHECKSUM.matcher(hex).matches()) {
                throw new FormatException("a root is a PEM certificate or a SHA-256 fingerprint (64 hex digits)");
            }
            this.rootFingerprint = hex;
            this.root = null;
            return this;
        }

        /** Pin the attestation root from a PEM file (cape serve's attestation/root.pem). */
        public Builder root(Path pem) {
            try {
                return root(Roots.load(Files.readAllBytes(pem)));
            } catch (IOException e) {
                throw new FormatException("cannot read the root file " + pem + ": " + e.getMessage());
            }
        }

        public Builder root(X509Certificate certificate) {
            this.root = certificate;
            this.rootFingerprint = null;
            return this;
        }

        /** Allow {@code hex} for PCR {@code index} (repeat to allow several values). */
        public Builder pcr(int index, String hex) {
            if (index < 0 || index >= 32) {
                throw new FormatException("PCR index " + index + " is outside 0..31");
            }
            byte[] value;
            try {
                value = HexFormat.of().parseHex(hex);
            } catch (IllegalArgumentException e) {
                throw new FormatException("PCR" + index + " value '" + hex + "' is not hex");
            }
            if (value.length != 32 && value.length != 48 && value.length != 64) {
                throw new FormatException("PCR" + index + " value must be 32, 48 or 64 bytes, got " + value.length);
            }
            pcrs.computeIfAbsent(index, i -> new HashSet<>()).add(ByteBuffer.wrap(value));
            return this;
        }

        /** PCR pins as pycape takes them: index to allowed hex values (0-2 and 8 matter most). */
        public Builder pcrs(Map<Integer, List<String>> pins) {
            pins.forEach((index, values) -> values.forEach(v -> pcr(index, v)));
            return this;
        }

        /** Seal results to a response key bound into the document (default true). */
        public Builder sealResults(boolean seal) {
            this.sealResults = seal;
            return this;
        }

        /** How long to wait for any one server frame (default 5 minutes). */
        public Builder timeout(Duration timeout) {
            this.timeout = timeout;
            return this;
        }

        /** The time documents are checked at (default: now). */
        public Builder clock(Supplier<Instant> clock) {
            this.clock = clock;
            return this;
        }

        public Cape build() {
            return new Cape(this);
        }
    }
}

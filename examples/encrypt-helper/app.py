"""encrypt-helper: seal a value for later, from inside the enclave, with ``cape_encrypt``.

The enclave provides the module ``cape_encrypt`` to every function (nothing to install or
ship). ``cape_encrypt.encrypt(data)`` returns ``"cape:" + base64``: an envelope sealed to the
Cape key of the function's owner, which only an enclave running one of the owner's functions
can open. Any of them decrypts it automatically when it arrives as an input, so running the
output through the owner's ``echo`` function gives the original value back.

The input is sealed as it arrives. A ``cape:`` input has already been decrypted by the
enclave, so sealing it again gives a fresh ciphertext of the same plaintext (re-encryption).
``cape_encrypt.decrypt`` is the inverse; here it checks the new envelope before returning it.
"""

import cape_encrypt


def cape_handler(input: bytes) -> str:
    sealed = cape_encrypt.encrypt(input)
    if cape_encrypt.decrypt(sealed) != input:  # cannot happen; shows the inverse call
        raise RuntimeError("the sealed value does not decrypt to the input")
    return sealed
